"""Datasets: the train/val/test split, its files, the sequence store batches are cut from, and interaction logs.

Sequences live in one flat int32 array plus offsets (CSR), so a dataset of millions of events holds no
per-user Python objects and a batch of left-padded windows is a single fancy-indexing operation.
"""
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow
import pyarrow.parquet
import torch
from torch.utils.data.distributed import DistributedSampler

from config import GSASRecError, GSASRecExperimentConfig

DATASETS_DIR = Path(__file__).resolve().parent / "datasets"
DATASETS_DIR_ENV = "GSASREC_DATASETS_DIR"
SPLIT_FILES = ("train/input.txt", "val/input.txt", "val/output.txt", "test/input.txt", "test/output.txt")
LOG_SEPARATORS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".zip"}
# Errors pandas and pyarrow raise on unreadable files (EmptyDataError and ParserError are ValueErrors).
READ_ERRORS = (ValueError, OSError, UnicodeError, pyarrow.ArrowException)


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """Start offsets of sequences laid end to end, plus the total: (len(lengths) + 1,) int64."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


@dataclass
class Sequences:
    """Variable-length item sequences stored flat: sequence i is items[offsets[i]:offsets[i + 1]]."""
    items: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def windows(self, rows: np.ndarray, length: int, padding_id: int,
                prefix_lengths: np.ndarray | None = None) -> np.ndarray:
        """The last `length` items of each chosen sequence (or of its first prefix_lengths[i] items), left-padded
        with padding_id: (len(rows), length)."""
        ends = self.offsets[1:][rows] if prefix_lengths is None else self.offsets[:-1][rows] + prefix_lengths
        positions = ends[:, None] - length + np.arange(length)
        is_item = positions >= self.offsets[:-1][rows][:, None]
        return np.where(is_item, self.items[np.where(is_item, positions, 0)], padding_id)

    def select(self, rows: np.ndarray) -> "Sequences":
        return self._take(self.offsets[:-1][rows], self.lengths[rows])

    def drop_last(self, count: int) -> "Sequences":
        """Each sequence without its last `count` items (empty if it is that short)."""
        lengths = np.maximum(self.lengths - count, 0)
        return self.select_prefixes(lengths)

    def select_prefixes(self, lengths: np.ndarray) -> "Sequences":
        return self._take(self.offsets[:-1], lengths)

    def _take(self, starts: np.ndarray, lengths: np.ndarray) -> "Sequences":
        """New sequences of items[starts[i]:starts[i] + lengths[i]], in one vectorised gather."""
        offsets = offsets_from_lengths(lengths)
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Sequences(self.items[gather], offsets)


def length_groups(lengths: np.ndarray, max_padding: int | None = None, max_rows: int | None = None,
                  max_positions: int | None = None) -> list[np.ndarray]:
    """Row numbers in groups of similar length, for passes that cut each group to its longest row: sorted by
    length, a group takes the next row while the padding that cut adds stays within max_padding, its rows within
    max_rows and its rows times its longest within max_positions. The greedy cut is a Python loop over the lengths
    (about a microsecond a row)."""
    order = np.argsort(lengths, kind="stable")
    groups, start, total = [], 0, 0
    for end, length in enumerate(lengths[order].tolist()):
        rows, total = end - start + 1, total + length
        if end > start and ((max_padding is not None and rows * length - total > max_padding)
                            or (max_rows is not None and rows > max_rows)
                            or (max_positions is not None and rows * length > max_positions)):
            groups.append(order[start:end])
            start, total = end, length
    return groups + [order[start:]]


@dataclass
class DatasetSplit:
    """The five split files of a dataset, plus its item count (ids 1..num_items; num_items+1 pads)."""
    train: Sequences
    val_input: Sequences
    val_target: np.ndarray
    test_input: Sequences
    test_target: np.ndarray
    num_items: int

    @property
    def padding_id(self) -> int:
        return self.num_items + 1

    def whole_histories(self) -> Sequences:
        """Every user's whole known sequence (line i of test/ is user i): the test input, then its target."""
        offsets = offsets_from_lengths(self.test_input.lengths + 1)
        is_target = np.zeros(offsets[-1], dtype=bool)
        is_target[offsets[1:] - 1] = True
        items = np.empty(offsets[-1], dtype=self.test_input.items.dtype)
        items[is_target], items[~is_target] = self.test_target, self.test_input.items
        return Sequences(items, offsets)


def sequences_from_pairs(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, Sequences]:
    """Groups (user, item) events into per-user sequences, users in order of first appearance,
    each user's events in file order (a stable sort). Returns the user ids and their sequences."""
    unique_users, first_index, inverse = np.unique(users, return_index=True, return_inverse=True)
    appearance_rank = np.empty(len(unique_users), dtype=np.int64)
    appearance_rank[np.argsort(first_index, kind="stable")] = np.arange(len(unique_users))
    event_rank = appearance_rank[inverse]
    order = np.argsort(event_rank, kind="stable")
    counts = np.bincount(event_rank, minlength=len(unique_users))
    user_ids = unique_users[np.argsort(first_index, kind="stable")]
    return user_ids, Sequences(items[order].astype(np.int32), offsets_from_lengths(counts))


def validation_user_mask(user_ids: np.ndarray, num_users: int, num_val_users: int, seed: int) -> np.ndarray:
    """The official scheme: draw num_val_users of range(num_users) and test membership with the user id
    itself (for ML-1M, ids run 1..6040 while the draw runs 0..6039)."""
    chosen = np.random.RandomState(seed).choice(num_users, num_val_users, replace=False)
    return np.isin(user_ids, chosen)


def split_sequences(sequences: Sequences, is_val_user: np.ndarray) -> dict:
    """Leave-one-out split: every user's last item is the test target, the one before it the validation
    target of validation users; training stops before the first held-out item."""
    lengths = sequences.lengths
    ends = sequences.offsets[1:]
    val_rows = np.flatnonzero(is_val_user)
    train_lengths = np.maximum(lengths - np.where(is_val_user, 3, 2), 0)
    test_input = sequences.drop_last(1)
    return {
        "train/input.txt": sequences.select_prefixes(train_lengths),
        "val/input.txt": test_input.drop_last(1).select(val_rows),
        "val/output.txt": sequences.items[ends[val_rows] - 2],
        "test/input.txt": test_input,
        "test/output.txt": sequences.items[ends - 1],
    }


def format_sequences(sequences: Sequences) -> str:
    """One line per sequence, items separated by single spaces, '\\n' line ends."""
    tokens = sequences.items.astype(str)
    return "".join(" ".join(tokens[start:end]) + "\n"
                   for start, end in zip(sequences.offsets[:-1], sequences.offsets[1:]))


def write_split_files(directory: Path, split_files: dict, stats: dict) -> None:
    """The split files and dataset_stats.json, written into a new folder."""
    for name, content in split_files.items():
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Sequences):
            path.write_text(format_sequences(content))
        else:
            path.write_text("".join(f"{item}\n" for item in content))
    (Path(directory) / "dataset_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def write_split(directory: Path, split_files: dict, stats: dict) -> None:
    """Writes the split into a temporary folder and renames its entries into place, so no half-written file is
    ever left behind; other files in the folder (ML-1M's source and script) stay."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        write_split_files(temporary, split_files, stats)
        directory.mkdir(exist_ok=True)
        for name in ["train", "val", "test", "dataset_stats.json"]:
            target = directory / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(temporary / name, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_integers(text: bytes) -> np.ndarray | None:
    """The whitespace-separated integers in text, or None where numpy cannot read it to its end; callers
    compare the count with the tokens they expect."""
    try:
        return np.fromstring(text, dtype=np.int64, sep=" ") if text.strip() else np.zeros(0, np.int64)
    except ValueError:
        return None


def dataset_directory(dataset_name: str) -> Path:
    """datasets/NAME, or NAME under $GSASREC_DATASETS_DIR when that is set."""
    return Path(os.environ.get(DATASETS_DIR_ENV) or DATASETS_DIR) / dataset_name


def dataset_recipe(dataset_name: str) -> types.ModuleType | None:
    """datasets/NAME/preprocess_NAME.py, the module that builds a public dataset's split from its source file with
    prepare(source, directory) (ML-1M's), or None where there is none."""
    path = DATASETS_DIR / dataset_name / f"preprocess_{dataset_name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"preprocess_{dataset_name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_dataset(dataset_name: str, source: str | None = None) -> Path:
    """The dataset's folder, prepared first by its recipe (dataset_recipe) when its split is missing."""
    directory = dataset_directory(dataset_name)
    complete = all((directory / name).is_file() for name in SPLIT_FILES + ("dataset_stats.json",))
    if not complete:
        recipe = dataset_recipe(dataset_name)
        if recipe is None:
            raise GSASRecError(f"dataset {dataset_name!r} not found in {directory}; "
                               f"prepare it with datasets/prepare_dataset.py --name {dataset_name}")
        print(f"Preparing the {dataset_name} split...")
        recipe.prepare(source, directory)
    return directory


def read_sequences(path: Path, num_items: int) -> Sequences:
    """Reads one sequence per line and checks every id lies in 1..num_items, naming file and line."""
    text = Path(path).read_bytes()
    if text and not text.endswith(b"\n"):
        text += b"\n"
    newlines = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == ord("\n"))
    tokens_per_line = _tokens_per_line(text, newlines)
    values = parse_integers(text)
    offsets = offsets_from_lengths(tokens_per_line)
    if values is None or len(values) != offsets[-1]:
        raise GSASRecError(f"{path}: contains something other than space-separated integer item ids")
    _check_item_ids(path, values, offsets, num_items)
    return Sequences(values.astype(np.int32), offsets)


def _tokens_per_line(text: bytes, newlines: np.ndarray) -> np.ndarray:
    """Counts whitespace-separated tokens on each line, vectorised over the bytes."""
    data = np.frombuffer(text, dtype=np.uint8)
    is_space = (data == ord(" ")) | (data == ord("\n")) | (data == ord("\t")) | (data == ord("\r"))
    token_starts = ~is_space & np.concatenate([[True], is_space[:-1]])
    line_of_start = np.searchsorted(newlines, np.flatnonzero(token_starts))
    return np.bincount(line_of_start, minlength=len(newlines)).astype(np.int64)


def _check_item_ids(path: Path, values: np.ndarray, offsets: np.ndarray, num_items: int) -> None:
    bad = np.flatnonzero((values < 1) | (values > num_items))
    if len(bad):
        line = int(np.searchsorted(offsets, bad[0], side="right"))
        raise GSASRecError(f"{path}, line {line}: item id {values[bad[0]]} is outside 1..{num_items}")


def read_targets(path: Path, num_items: int) -> np.ndarray:
    sequences = read_sequences(path, num_items)
    wrong = np.flatnonzero(sequences.lengths != 1)
    if len(wrong):
        raise GSASRecError(f"{path}, line {wrong[0] + 1}: expected exactly one target item id")
    return sequences.items


def load_dataset(directory: Path) -> DatasetSplit:
    """Reads and validates a prepared split: ids in range, inputs and targets of equal line counts."""
    directory = Path(directory)
    stats_path = directory / "dataset_stats.json"
    try:
        num_items = int(json.loads(stats_path.read_text())["num_items"])
    except FileNotFoundError:
        raise GSASRecError(f"{stats_path} not found: is {directory} a prepared dataset?") from None
    except (ValueError, KeyError, TypeError):
        raise GSASRecError(f"{stats_path}: expected JSON with an integer 'num_items'") from None
    if num_items < 2:
        raise GSASRecError(f"{stats_path}: num_items must be at least 2 (there is nothing to rank), got {num_items}")
    files = {}
    for name in SPLIT_FILES:
        path = directory / name
        if not path.is_file():
            raise GSASRecError(f"{path} not found: the split in {directory} is incomplete")
        files[name] = read_targets(path, num_items) if name.endswith("output.txt") else read_sequences(path, num_items)
    for stage in ("val", "test"):
        inputs, targets = len(files[f"{stage}/input.txt"]), len(files[f"{stage}/output.txt"])
        if inputs != targets:
            raise GSASRecError(f"{directory / stage}: input.txt has {inputs} lines but output.txt has {targets}")
        if not inputs:
            raise GSASRecError(f"{directory / stage}: no users; validation and test need at least one each")
    return DatasetSplit(files["train/input.txt"], files["val/input.txt"], files["val/output.txt"],
                        files["test/input.txt"], files["test/output.txt"], num_items)


@dataclass
class RawIds:
    """A dataset's ids as its log had them, indexed by the dataset's ids (row 0 unused): users[user_id] and
    items[item_id] as text from users.tsv and items.tsv (datasets/prepare_dataset.py), or the dataset's own ids
    where it has no such mapping (ML-1M); titles[item_id] where items.tsv has titles."""
    users: np.ndarray
    items: np.ndarray
    titles: np.ndarray | None


def read_raw_ids(directory: Path, num_users: int, num_items: int) -> RawIds:
    """The dataset's users.tsv and items.tsv, each checked to list ids 1..N in order."""
    def table(name: str, id_column: str, count: int) -> pd.DataFrame:
        path = Path(directory) / name
        if not path.is_file():
            return pd.DataFrame()
        # As text, and without reading 'NA' or '' as missing: raw ids stay exactly what the log had.
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        if id_column not in frame or not np.array_equal(frame[id_column].to_numpy(),
                                                        np.arange(1, count + 1).astype(str)):
            raise GSASRecError(f"{path}: expected a column {id_column} listing 1..{count} in order")
        return frame

    def indexed(frame: pd.DataFrame, column: str) -> np.ndarray | None:
        return np.concatenate([[None], frame[column].to_numpy(dtype=object)]) if column in frame else None

    users, items = table("users.tsv", "user_id", num_users), table("items.tsv", "item_id", num_items)
    raw_users, raw_items = indexed(users, "raw_user_id"), indexed(items, "raw_item_id")
    return RawIds(np.arange(num_users + 1) if raw_users is None else raw_users,
                  np.arange(num_items + 1) if raw_items is None else raw_items, indexed(items, "title"))


def read_item_titles(directory: Path) -> dict[int, str]:
    """item_id -> title from the dataset's items.tsv, or {} when it has none."""
    path = Path(directory) / "items.tsv"
    if not path.is_file():
        return {}
    table = pd.read_csv(path, sep="\t")
    if not {"item_id", "title"} <= set(table.columns):
        return {}
    return dict(zip(table["item_id"].astype(int), table["title"].astype(str)))


def training_batch(dataset: DatasetSplit, rows: np.ndarray, config: GSASRecExperimentConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """A window of up to sequence_length + 1 items of each chosen user, cut to the longest one in the batch: the
    latest items, or (training_window="random") those before an end drawn uniformly from the ends that still
    fill the window. Only the random windows draw from the generator."""
    lengths = dataset.train.lengths[rows]
    window = config.sequence_length + 1
    if config.training_window == "random":
        shortest = np.minimum(lengths, window)
        draw = torch.rand(len(rows), generator=generator, device=generator.device).cpu().numpy()
        lengths = shortest + np.floor(draw * (lengths - shortest + 1)).astype(np.int64)
    width = min(int(lengths.max()), window)
    return torch.from_numpy(dataset.train.windows(rows, width, dataset.padding_id, lengths).astype(np.int64))


class InteractionWeightedSampler:
    """user_sampling="per_interaction": an epoch draws as many users as there are, with replacement, each in
    proportion to (length - 1) / (min(length, window) - 1), its training targets over those one window holds; with
    random windows every interaction is then a target about equally often. Each rank takes its own share of one
    draw, which depends only on the seed and the epoch (as DistributedSampler's shuffle), so a resumed run repeats
    it."""

    def __init__(self, lengths: np.ndarray, window: int, num_replicas: int, rank: int, seed: int):
        self.weights = torch.from_numpy((lengths - 1) / (np.minimum(lengths, window) - 1))
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(lengths) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True,
                                 generator=generator)
        return iter(draw[self.rank::self.num_replicas].tolist())


def epoch_sampler(lengths: np.ndarray, config: GSASRecExperimentConfig, num_replicas: int, rank: int
                  ) -> DistributedSampler | InteractionWeightedSampler:
    """Which of the trainable sequences (their lengths) an epoch shows this rank, in order: each once, shuffled
    (user_sampling="uniform"), or drawn in proportion to their targets (InteractionWeightedSampler)."""
    if config.user_sampling == "per_interaction":
        return InteractionWeightedSampler(lengths, config.sequence_length + 1, num_replicas, rank, config.seed)
    return DistributedSampler(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=config.seed)


# Interaction logs in CSV, TSV or Parquet: datasets/prepare_dataset.py's input, recommend_gsasrec.py's --histories.

def file_separator(path: Path, sep: str | None) -> str | None:
    """The column separator of a text file (from --sep or the extension), None for Parquet."""
    suffixes = [suffix.lower() for suffix in path.suffixes if suffix.lower() not in COMPRESSIONS]
    extension = suffixes[-1] if suffixes else ""
    if extension == ".parquet":
        return None
    if sep or extension in LOG_SEPARATORS:
        return sep or LOG_SEPARATORS[extension]
    raise GSASRecError(f"{path}: cannot tell the format from the extension {extension or '(none)'!r}; use .csv, "
                       ".tsv, .txt or .parquet (optionally compressed, e.g. .csv.gz), or pass --sep")


def available_columns(path: Path, sep: str | None) -> list[str]:
    """The header of the file, read without its data."""
    if sep is None:
        return list(pyarrow.parquet.read_schema(path).names)
    try:
        return list(pd.read_csv(path, sep=sep, nrows=0, engine=text_engine(sep)).columns)
    except pd.errors.EmptyDataError:
        raise GSASRecError(f"{path} is empty") from None


def text_engine(sep: str) -> str:
    """pandas' fast C parser handles one-character separators; longer ones (e.g. '::') need Python's."""
    return "c" if len(sep) == 1 else "python"


def read_columns(path: Path, columns: list[str], text_columns: list[str], sep: str | None) -> pd.DataFrame:
    """Only the needed columns; text_columns of text files as strings, so ids '007' and '7' stay distinct."""
    if not path.is_file():
        raise GSASRecError(f"input file not found: {path}")
    try:
        present = available_columns(path, sep)
        missing = [column for column in columns if column not in present]
        if missing:
            raise GSASRecError(f"{path}: no column(s) {', '.join(map(repr, missing))}; the file has "
                               f"{', '.join(map(repr, present))} (pick them with the --*-col options)")
        if sep is None:
            frame = pd.read_parquet(path, columns=columns)
        else:
            frame = pd.read_csv(path, sep=sep, usecols=columns, engine=text_engine(sep),
                                dtype={column: "str" for column in text_columns})
    except READ_ERRORS as error:
        raise GSASRecError(f"{path}: cannot be read ({first_line(error)})") from None
    if frame.empty:
        raise GSASRecError(f"{path} holds no events")
    return frame


def first_line(error: Exception) -> str:
    """The gist of a library error, since the command reports problems on one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def encode_ids(values: pd.Series, what: str) -> tuple[np.ndarray, pd.Index]:
    """Dense int32 codes in order of first appearance, refusing missing ids."""
    codes, uniques = pd.factorize(values)
    missing = np.flatnonzero(codes < 0)
    if len(missing):
        raise GSASRecError(f"{what} column {values.name!r}, data row {missing[0] + 1}: missing {what} id")
    return codes.astype(np.int32), pd.Index(uniques)


def parse_times(values: pd.Series) -> np.ndarray:
    """Event times as sortable numbers: numbers as they are, date-time strings parsed as ISO 8601 (any
    precision, as logs mix them) or else in the one format pandas infers from the first string."""
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    elif looks_numeric(values):
        parsed = pd.to_numeric(values, errors="coerce")
    else:
        parsed = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
        if parsed.isna().any():
            parsed = pd.to_datetime(values, errors="coerce", utc=True)
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        raise GSASRecError(f"time column {values.name!r}, data row {bad[0] + 1}: {values.iloc[bad[0]]!r} is "
                           "not a number or a date-time (ISO 8601, or one format throughout)")
    if pd.api.types.is_datetime64_any_dtype(parsed):
        return parsed.astype("int64").to_numpy()
    return parsed.to_numpy()


def looks_numeric(values: pd.Series) -> bool:
    """Whether a text column holds numbers rather than date-times, judged by its first value."""
    first = values.first_valid_index()
    return first is not None and not pd.isna(pd.to_numeric(values.loc[first], errors="coerce"))


def time_order(users: np.ndarray, times: np.ndarray | None) -> np.ndarray:
    """Rows sorted by (user, time); equal times keep their file order (both sorts are stable)."""
    if times is None:
        return np.argsort(users, kind="stable")
    by_time = np.argsort(times, kind="stable")
    return by_time[np.argsort(users[by_time], kind="stable")]
