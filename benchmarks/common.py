"""Shared by the benchmarks: the ML-1M split (or a synthetic one of the same shape) and the JSON report."""
import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import GSASRecError  # noqa: E402
from dataset_utils import (DatasetSplit, Sequences, ensure_dataset, load_dataset, offsets_from_lengths,  # noqa: E402
                           split_sequences, validation_user_mask)
from utils import machine_description  # noqa: E402


def synthetic_ml1m_shaped(seed: int = 0) -> DatasetSplit:
    """6040 users, 3416 items, sequence lengths drawn like ML-1M's (heavy-tailed, mean about 165)."""
    rng = np.random.RandomState(seed)
    lengths = np.clip(rng.lognormal(4.6, 0.95, 6040).astype(np.int64), 20, 2300)
    offsets = offsets_from_lengths(lengths)
    sequences = Sequences(rng.randint(1, 3417, offsets[-1]).astype(np.int32), offsets)
    split = split_sequences(sequences, validation_user_mask(np.arange(1, 6041), 6040, 512, 42))
    return DatasetSplit(split["train/input.txt"], split["val/input.txt"], split["val/output.txt"],
                        split["test/input.txt"], split["test/output.txt"], 3416)


def benchmark_dataset(source: str | None) -> tuple[DatasetSplit, str]:
    try:
        return load_dataset(ensure_dataset("ml1m", source)), "ml1m"
    except GSASRecError as error:
        print(f"ML-1M unavailable ({error}); using a synthetic dataset of the same shape", file=sys.stderr)
        return synthetic_ml1m_shaped(), "synthetic-ml1m-shaped"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(**figures) -> None:
    machine = machine_description(torch.device(figures.get("device", "cpu")))
    print(json.dumps({**figures, "peak_rss_mb": round(peak_rss_mb(), 1), "device_name": machine["device"],
                      "torch": machine["torch"], "threads": machine["threads"]}))
