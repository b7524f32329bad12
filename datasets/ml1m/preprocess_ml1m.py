"""Builds the official ML-1M split in datasets/ml1m (train/val/test, dataset_stats.json).

The raw file comes from --source, else $GSASREC_ML1M_SOURCE, else datasets/ml1m/ml-1m.txt, else a download
from the public URL; its sha256 is always checked. train_gsasrec.py runs prepare() when the split is missing
(dataset_utils.ensure_dataset).
"""
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPOSITORY = str(Path(__file__).resolve().parents[2])
if REPOSITORY not in sys.path:  # run as a script; dataset_utils.dataset_recipe loads it with the path set
    sys.path.insert(0, REPOSITORY)

from config import GSASRecError  # noqa: E402
from dataset_utils import (SPLIT_FILES, dataset_directory, parse_integers, sequences_from_pairs,  # noqa: E402
                           sha256_of, split_sequences, validation_user_mask, write_split)
from utils import CommandLineParser, run_cli  # noqa: E402

URL = "https://raw.githubusercontent.com/asash/ml1m-sas-mapping/main/ml-1m_sas.txt"
SHA256 = "b725f3acb3986fe3130bffd1e77a74d182a1f51799567a236dbd60270f95b0a2"
SOURCE_ENV = "GSASREC_ML1M_SOURCE"
HOW_TO_SUPPLY = (f"pass --source PATH, set {SOURCE_ENV}=PATH, or place the file at datasets/ml1m/ml-1m.txt "
                 f"(sha256 {SHA256[:12]}..., from {URL})")


def find_source(source: str | None = None) -> Path:
    """The ML-1M file from --source, the environment variable, datasets/ml1m/ml-1m.txt, or a download."""
    candidate = source or os.environ.get(SOURCE_ENV)
    if candidate:
        path = Path(candidate).expanduser()
        if not path.is_file():
            raise GSASRecError(f"ML-1M source file not found: {path}; {HOW_TO_SUPPLY}")
    else:
        path = dataset_directory("ml1m") / "ml-1m.txt"
        if not path.is_file():
            download(URL, path)
    digest = sha256_of(path)
    if digest != SHA256:
        raise GSASRecError(f"{path} has sha256 {digest}, expected {SHA256} (wrong or truncated file); {HOW_TO_SUPPLY}")
    return path


def download(url: str, path: Path) -> None:
    print(f"Downloading {url} -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".part")
    try:
        urllib.request.urlretrieve(url, temporary)
    except (urllib.error.URLError, OSError) as error:
        temporary.unlink(missing_ok=True)
        raise GSASRecError(f"could not download {url} ({error}); {HOW_TO_SUPPLY}") from None
    os.replace(temporary, path)


def read_interaction_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads '<user> <item>' lines into two int64 arrays."""
    text = Path(path).read_bytes()
    values = parse_integers(text)
    if values is None or values.size % 2 or values.size != len(text.split()):
        raise GSASRecError(f"{path}: expected lines of two integers '<user> <item>'")
    pairs = values.reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def prepare(source: str | None = None, directory: Path | None = None) -> Path:
    """Builds the official ML-1M split (byte-identical to the reference hashes) into datasets/ml1m."""
    directory = Path(directory or dataset_directory("ml1m"))
    source_path = find_source(source)
    users, items = read_interaction_pairs(source_path)
    user_ids, sequences = sequences_from_pairs(users, items)
    is_val_user = validation_user_mask(user_ids, len(user_ids), 512, seed=42)
    stats = {"num_users": int(len(user_ids)), "num_items": int(items.max()), "num_interactions": int(len(items))}
    write_split(directory, split_sequences(sequences, is_val_user), stats)
    titles = source_path.parent / "items.tsv"
    if titles.is_file() and titles.resolve() != (directory / "items.tsv").resolve():
        shutil.copyfile(titles, directory / "items.tsv")
    return directory


def main() -> None:
    parser = CommandLineParser(__doc__)
    parser.add_argument("--source", help=f"path to ml-1m.txt (sha256 {SHA256[:8]}...)")
    parser.add_argument("--output-dir", help="where to write the split (default: datasets/ml1m)")
    args = parser.parse_args()
    directory = prepare(args.source, args.output_dir)
    for name in SPLIT_FILES:
        print(f"{sha256_of(directory / name)}  {name}")
    print(f"Split written to {directory}")


if __name__ == "__main__":
    run_cli(main)
