"""Shared by the benchmarks: the ML-1M split or a synthetic one of any size, and the JSON report."""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from config import GSASRecError  # noqa: E402
from dataset_utils import (DatasetSplit, Sequences, ensure_dataset, load_dataset, offsets_from_lengths,  # noqa: E402
                           split_sequences, validation_user_mask)
from utils import machine_description, whole_number_at_least  # noqa: E402


def synthetic_dataset(num_users: int = 6040, num_items: int = 3416, seed: int = 0) -> DatasetSplit:
    """Users with sequence lengths drawn like ML-1M's (heavy-tailed, mean about 165) over items of Zipf-like
    popularity (the item of popularity rank r with probability proportional to 1 / r); ML-1M's split scheme with
    512 validation users, or a tenth of the users when there are fewer than 5,120."""
    rng = np.random.RandomState(seed)
    lengths = np.clip(rng.lognormal(4.6, 0.95, num_users).astype(np.int64), 20, 2300)
    offsets = offsets_from_lengths(lengths)
    popularity = np.cumsum(1.0 / np.arange(1, num_items + 1))
    items = np.searchsorted(popularity / popularity[-1], rng.random_sample(offsets[-1])) + 1
    user_ids = np.arange(1, num_users + 1)
    val_users = min(512, max(1, num_users // 10))
    split = split_sequences(Sequences(items.astype(np.int32), offsets),
                            validation_user_mask(user_ids, num_users, val_users, 42))
    return DatasetSplit(split["train/input.txt"], split["val/input.txt"], split["val/output.txt"],
                        split["test/input.txt"], split["test/output.txt"], num_items)


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="path to ml-1m.txt")
    parser.add_argument("--synthetic", action="store_true",
                        help="a synthetic dataset (ML-1M-like lengths, Zipf-like popularity) instead of ML-1M")
    count = whole_number_at_least(1)
    parser.add_argument("--num-items", type=count, default=3416, help="with --synthetic (default 3416)")
    parser.add_argument("--num-users", type=count, default=6040, help="with --synthetic (default 6040)")


def benchmark_dataset(args: argparse.Namespace) -> tuple[DatasetSplit, str]:
    """ML-1M, or the synthetic dataset asked for (or of ML-1M's size where ML-1M is unavailable)."""
    if not args.synthetic:
        try:
            return load_dataset(ensure_dataset("ml1m", args.source)), "ml1m"
        except GSASRecError as error:
            print(f"ML-1M unavailable ({error}); using a synthetic dataset of its size", file=sys.stderr)
    return (synthetic_dataset(args.num_users, args.num_items),
            f"synthetic-{args.num_users}-users-{args.num_items}-items")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(**figures) -> None:
    machine = machine_description(torch.device(figures.get("device", "cpu")))
    print(json.dumps({**figures, "peak_rss_mb": round(peak_rss_mb(), 1), "device_name": machine["device"],
                      "torch": machine["torch"], "threads": machine["threads"]}))


def timed(command: list[str], log: Path) -> tuple[int, float, str]:
    """Runs a command from the repository root: (exit status, wall seconds, its output), the output also in log."""
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    output = finished.stdout + finished.stderr
    log.write_text(output)
    return finished.returncode, round(time.perf_counter() - started, 1), output


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]
