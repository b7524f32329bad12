"""Builds the official ML-1M split in datasets/ml1m (train/val/test, dataset_stats.json).

The raw file comes from --source, else $GSASREC_ML1M_SOURCE, else datasets/ml1m/ml-1m.txt, else a download
from the public URL; its sha256 is always checked. train_gsasrec.py runs this when the split is missing.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dataset_utils import SPLIT_FILES, prepare_ml1m, sha256_of  # noqa: E402
from utils import CommandLineParser, run_cli  # noqa: E402


def main() -> None:
    parser = CommandLineParser(__doc__)
    parser.add_argument("--source", help="path to ml-1m.txt (sha256 b725f3ac...)")
    parser.add_argument("--output-dir", help="where to write the split (default: datasets/ml1m)")
    args = parser.parse_args()
    directory = prepare_ml1m(args.source, args.output_dir)
    for name in SPLIT_FILES:
        print(f"{sha256_of(directory / name)}  {name}")
    print(f"Split written to {directory}")


if __name__ == "__main__":
    run_cli(main)
