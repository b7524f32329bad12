"""Turns an interaction log (CSV, TSV or Parquet) into a dataset with ML-1M's layout and split.

  1. reads the user, item and (optional) time columns; without --time-col the file order is the time order;
  2. applies the duplicates policy to events with equal (user, item, time);
  3. iterative k-core filtering: drops users with fewer than --min-user-interactions events and items with
     fewer than --min-item-interactions until neither is left (0 disables either);
  4. drops users left with fewer than 3 events: they cannot give a train, a validation and a test item;
  5. numbers users 1..U and items 1..N in order of first appearance in the file (after filtering);
  6. orders each user's events by time; equal times keep their file order (a stable sort on (user, time));
  7. splits leave-one-out with the ML-1M scheme: every user's last item is the test target, the one before
     it the validation target of --num-val-users users drawn with --seed.

Writes train/, val/, test/, dataset_stats.json, items.tsv (item_id, raw_item_id[, title]) and users.tsv
(user_id, raw_user_id) into datasets/NAME (or $GSASREC_DATASETS_DIR/NAME, or --output-dir). The dataset
is built in a hidden sibling folder and renamed into place, so it is never half written.
"""
import argparse
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import GSASRecError  # noqa: E402
from dataset_utils import (DATASETS_DIR, DATASETS_DIR_ENV, dataset_directory, encode_ids, file_separator,  # noqa: E402
                           parse_times, read_columns, sequences_from_pairs, split_sequences, time_order,
                           validation_user_mask, write_split_files)
from utils import CommandLineParser, run_cli, whole_number_at_least, writable_folder  # noqa: E402

MIN_EVENTS_TO_SPLIT = 3
DATASET_ENTRIES = {"train", "val", "test", "dataset_stats.json", "items.tsv", "users.tsv"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Events:
    """The log in file order, as dense codes: users[i] indexes raw_users, items[i] raw_items."""
    users: np.ndarray
    items: np.ndarray
    times: np.ndarray | None
    raw_users: pd.Index
    raw_items: pd.Index
    item_titles: pd.Index | None

    def take(self, rows: np.ndarray) -> "Events":
        """The chosen rows; the raw id tables stay whole, as the codes index them."""
        times = None if self.times is None else self.times[rows]
        return Events(self.users[rows], self.items[rows], times, self.raw_users, self.raw_items, self.item_titles)


def first_rows_of_codes(codes: np.ndarray) -> np.ndarray:
    """Where each code first appears, for codes numbered in order of first appearance (as pd.factorize does)."""
    running_max = np.maximum.accumulate(codes)
    return np.flatnonzero(np.concatenate([[True], running_max[1:] > running_max[:-1]]))


def read_events(path: Path, args: argparse.Namespace) -> Events:
    """The log as compact codes, so the raw columns (strings, perhaps) can be freed early."""
    text_columns = [args.user_col, args.item_col] + ([args.title_col] if args.title_col else [])
    columns = text_columns + ([args.time_col] if args.time_col else [])
    if len(set(columns)) < len(columns):
        raise GSASRecError(f"the user, item, time and title columns must differ, got {columns}")
    frame = read_columns(path, columns, text_columns, file_separator(path, args.sep))
    users, raw_users = encode_ids(frame[args.user_col], "user")
    items, raw_items = encode_ids(frame[args.item_col], "item")
    times = parse_times(frame[args.time_col]) if args.time_col else None
    titles = pd.Index(frame[args.title_col].to_numpy()[first_rows_of_codes(items)]) if args.title_col else None
    return Events(users, items, times, raw_users, raw_items, titles)


def apply_duplicates_policy(events: Events, policy: str) -> tuple[Events, int]:
    """Keeps, drops (all but the first) or refuses events repeating a (user, item, time); without a time
    column every event has its own time (its position), so none repeats."""
    if policy == "keep" or events.times is None:
        return events, 0
    frame = pd.DataFrame({"user": events.users, "item": events.items, "time": events.times})
    repeated = frame.duplicated().to_numpy()
    count = int(repeated.sum())
    if policy == "error" and count:
        row = int(np.argmax(repeated))
        user, item = events.raw_users[events.users[row]], events.raw_items[events.items[row]]
        raise GSASRecError(f"data row {row + 1} repeats an earlier event (user {user!r}, item {item!r}, same "
                           f"time); {count} such events and --duplicates is 'error' (use keep or drop)")
    return (events.take(np.flatnonzero(~repeated)) if count else events), count


def k_core_rows(events: Events, rows: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """The rows left after repeatedly dropping users with fewer than min_user and items with fewer than
    min_item events among the rows still kept, until nothing changes."""
    while len(rows):
        users, items = events.users[rows], events.items[rows]
        user_counts = np.bincount(users, minlength=len(events.raw_users))
        item_counts = np.bincount(items, minlength=len(events.raw_items))
        kept = (user_counts[users] >= min_user) & (item_counts[items] >= min_item)
        if kept.all():
            break
        rows = rows[kept]
    return rows


def filter_events(events: Events, min_user: int, min_item: int) -> tuple[Events, dict]:
    """k-core filtering, then the same with users needing MIN_EVENTS_TO_SPLIT events; counts what went."""
    rows = k_core_rows(events, np.arange(len(events.users)), min_user, min_item)
    core_users = count_distinct(events.users[rows])
    rows = k_core_rows(events, rows, max(min_user, MIN_EVENTS_TO_SPLIT), min_item)
    kept = events.take(rows)
    users_left = count_distinct(kept.users)
    if not users_left:
        raise GSASRecError(f"no users left after filtering (each user needs {max(min_user, MIN_EVENTS_TO_SPLIT)} "
                           f"events, each item {min_item}); lower --min-user-interactions or "
                           "--min-item-interactions")
    dropped = {"dropped_users_by_filtering": len(events.raw_users) - core_users,
               "dropped_users_too_short": core_users - users_left,
               "dropped_items": len(events.raw_items) - count_distinct(kept.items),
               "dropped_interactions_by_filtering": len(events.users) - len(rows)}
    return kept, dropped


def count_distinct(codes: np.ndarray) -> int:
    """How many different codes occur, without sorting millions of them."""
    return int(np.count_nonzero(np.bincount(codes))) if len(codes) else 0


# Validation users when --num-val-users is not given: ML-1M's 512, or a tenth of the users of a smaller dataset.
DEFAULT_VAL_USERS = 512


def build_dataset(events: Events, num_val_users: int | None, seed: int) -> tuple[dict, dict, dict]:
    """The split files, the stats and the id mapping tables of the filtered events."""
    user_codes, user_index = pd.factorize(events.users)
    item_codes, item_index = pd.factorize(events.items)
    num_users, num_items = len(user_index), len(item_index)
    if num_val_users is None:
        num_val_users = min(DEFAULT_VAL_USERS, max(1, num_users // 10))
    if not 1 <= num_val_users <= num_users:
        raise GSASRecError(f"--num-val-users must be in 1..{num_users} (the users left), got {num_val_users}")
    order = time_order(user_codes, events.times)
    user_ids, sequences = sequences_from_pairs((user_codes[order] + 1).astype(np.int32),
                                               (item_codes[order] + 1).astype(np.int32))
    is_val_user = validation_user_mask(user_ids, num_users, num_val_users, seed)
    if not is_val_user.any():
        raise GSASRecError(f"the draw of {num_val_users} validation user(s) gave none (the ML-1M scheme draws from "
                           f"0..{num_users - 1} and matches user ids 1..{num_users}); raise --num-val-users")
    stats = {"num_users": num_users, "num_items": num_items, "num_interactions": len(order),
             "num_val_users": int(is_val_user.sum())}
    items = {"item_id": np.arange(1, num_items + 1), "raw_item_id": events.raw_items.take(item_index)}
    if events.item_titles is not None:
        items["title"] = events.item_titles.take(item_index)
    tables = {"users.tsv": pd.DataFrame({"user_id": np.arange(1, num_users + 1),
                                         "raw_user_id": events.raw_users.take(user_index)}),
              "items.tsv": pd.DataFrame(items)}
    return split_sequences(sequences, is_val_user), stats, tables


def check_output_directory(directory: Path) -> None:
    """Refuses a folder that holds anything but a dataset, since preparing replaces the whole folder."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise GSASRecError(f"{directory} exists and is not a folder")
    others = sorted(entry.name for entry in directory.iterdir() if entry.name not in DATASET_ENTRIES)
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise GSASRecError(f"{directory} holds other files ({listed}); preparing replaces the whole folder, so "
                           "choose another --name or --output-dir")


def write_dataset(directory: Path, split: dict, stats: dict, tables: dict) -> None:
    """Builds the whole dataset in a hidden sibling folder, then swaps it in: it is never half written."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        built = staging / directory.name
        write_split_files(built, split, stats)
        for name, table in tables.items():
            table.to_csv(built / name, sep="\t", index=False)
        if directory.exists():
            os.replace(directory, staging / "previous")
        os.replace(built, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def next_steps(directory: Path) -> str:
    """How to train on the dataset: the ML-1M recipe with this dataset, and the datasets folder when it is not
    the default."""
    name = directory.name
    environment = "" if directory.resolve() == (DATASETS_DIR / name).resolve() else \
        f"{DATASETS_DIR_ENV}={directory.parent} "
    return (f"Next, train with the ML-1M recipe on it (or write a config of your own with dataset_name={name!r}):\n"
            f"    {environment}python3 train_gsasrec.py --config=config_ml1m.py --set dataset_name={name}")


def parse_arguments() -> argparse.Namespace:
    parser = CommandLineParser(__doc__)
    parser.add_argument("--input", required=True, help="the log: .csv, .tsv, .txt or .parquet (.gz etc. ok)")
    parser.add_argument("--name", required=True, help="dataset name, the config's dataset_name")
    parser.add_argument("--output-dir", help="where to write it (default: datasets/NAME or $GSASREC_DATASETS_DIR/NAME)")
    parser.add_argument("--user-col", default="user_id")
    parser.add_argument("--item-col", default="item_id")
    parser.add_argument("--time-col", help="event time, numbers or date-times (default: none, the file order)")
    parser.add_argument("--title-col", help="item title column, copied into items.tsv")
    parser.add_argument("--sep", help="column separator of a text file (default: ',' for .csv, tab for .tsv/.txt)")
    parser.add_argument("--min-user-interactions", type=whole_number_at_least(0), default=5,
                        help="k-core: 0 disables (default 5)")
    parser.add_argument("--min-item-interactions", type=whole_number_at_least(0), default=5,
                        help="k-core: 0 disables (default 5)")
    parser.add_argument("--num-val-users", type=whole_number_at_least(1),
                        help=f"validation users (default {DEFAULT_VAL_USERS}, or a tenth of the users when fewer "
                             f"than {DEFAULT_VAL_USERS * 10} are left)")
    parser.add_argument("--seed", type=whole_number_at_least(0, 2 ** 32 - 1), default=42,
                        help="seed of the validation user draw, 0..2**32 - 1 (default 42)")
    parser.add_argument("--duplicates", choices=["keep", "drop", "error"], default="keep",
                        help="events repeating a (user, item, time): keep them all (default), keep the first, or stop")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    if not NAME_PATTERN.fullmatch(args.name):
        raise GSASRecError(f"--name {args.name!r}: use letters, digits, '.', '_' and '-' (not starting with '.')")
    directory = Path(args.output_dir) if args.output_dir else dataset_directory(args.name)
    check_output_directory(directory)
    writable_folder(directory.parent, "--output-dir" if args.output_dir else "the datasets folder")
    path = Path(args.input)
    events = read_events(path, args)
    events, duplicates = apply_duplicates_policy(events, args.duplicates)
    kept, dropped = filter_events(events, args.min_user_interactions, args.min_item_interactions)
    split, stats, tables = build_dataset(kept, args.num_val_users, args.seed)
    stats.update(dropped, dropped_duplicates=duplicates, source=str(path.resolve()))
    write_dataset(directory, split, stats, tables)
    print(f"Users: {stats['num_users']} ({dropped['dropped_users_by_filtering']} dropped by k-core filtering, "
          f"{dropped['dropped_users_too_short']} more with fewer than {MIN_EVENTS_TO_SPLIT} events), "
          f"items: {stats['num_items']} ({dropped['dropped_items']} dropped), "
          f"interactions: {stats['num_interactions']} ({duplicates} duplicates dropped), "
          f"validation users: {stats['num_val_users']}" +
          (" (a tenth of the users: pass --num-val-users to choose)" if args.num_val_users is None and
           stats["num_val_users"] < DEFAULT_VAL_USERS else ""))
    print(f"Dataset written to {directory}")
    print(next_steps(directory))


if __name__ == "__main__":
    run_cli(main)
