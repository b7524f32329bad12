"""Seconds and peak memory of datasets/prepare_dataset.py on a synthetic ML-20M-sized log, as one JSON line.

The log (default 20M events, 138k users, 27k items) has heavy-tailed user activity, Zipf item popularity and
second-resolution timestamps, in time order as a real log is; the preparation runs in a subprocess, so its
peak RSS is measured alone (RUSAGE_CHILDREN).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.csv
import pyarrow.parquet

REPO = Path(__file__).resolve().parents[1]
FULL_EVENTS, FULL_USERS, FULL_ITEMS = 20_000_000, 138_000, 27_000


def synthetic_log(events: int, users: int, items: int, seed: int = 0) -> pyarrow.Table:
    """user_id, item_id, timestamp rows sorted by time; user activity lognormal, item popularity 1/rank."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.0, users)
    lengths = np.floor(weights / weights.sum() * events).astype(np.int64)
    lengths[:events - lengths.sum()] += 1
    popularity = 1.0 / np.arange(1, items + 1)
    table = {"user_id": np.repeat(rng.permutation(users) + 1, lengths),
             "item_id": rng.choice(items, events, p=popularity / popularity.sum()) + 1,
             "timestamp": rng.integers(1_000_000_000, 1_150_000_000, events)}
    order = np.argsort(table["timestamp"], kind="stable")
    return pyarrow.table({name: column[order] for name, column in table.items()})


def write_log(table: pyarrow.Table, directory: Path, file_format: str) -> Path:
    path = directory / f"log.{file_format}"
    if file_format == "csv":
        pyarrow.csv.write_csv(table, path)
    else:
        pyarrow.parquet.write_table(table, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=FULL_EVENTS, help="log size; users and items scale with it")
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv")
    args = parser.parse_args()
    scale = args.events / FULL_EVENTS
    users, items = max(10, round(FULL_USERS * scale)), max(10, round(FULL_ITEMS * scale))
    with tempfile.TemporaryDirectory() as directory:
        log = write_log(synthetic_log(args.events, users, items), Path(directory), args.format)
        output = Path(directory) / "bench"
        started = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "datasets" / "prepare_dataset.py"), "--input", str(log),
                        "--name", "bench", "--output-dir", str(output), "--time-col", "timestamp"],
                       check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        stats = json.loads((output / "dataset_stats.json").read_text())
    print(json.dumps({"benchmark": "prepare_dataset", "format": args.format, "events": args.events,
                      "users": stats["num_users"], "items": stats["num_items"],
                      "interactions": stats["num_interactions"], "seconds": round(seconds, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
