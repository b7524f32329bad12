"""Evaluates a gSASRec checkpoint on the test split: full-catalogue ranking, ir_measures metrics.

The checkpoint carries its config, so --config is optional; when given, it must fit the checkpoint.
"""
import argparse
import json
import time
from pathlib import Path

from dataset_utils import ensure_dataset, load_dataset
from eval_utils import evaluate
from utils import load_config, model_from_checkpoint, read_checkpoint, resolve_device, run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_path", nargs="?", help="checkpoint file (same as --checkpoint)")
    parser.add_argument("--checkpoint", help="checkpoint file written by train_gsasrec.py")
    parser.add_argument("--config", help="config file; optional, the checkpoint holds its own")
    parser.add_argument("--split", choices=["test", "val"], default="test", help="which split to score (default: test)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--source", help="path to ml-1m.txt when the ML-1M split must be prepared")
    parser.add_argument("--output", help="also write the metrics as JSON to this file")
    args = parser.parse_args()
    checkpoint_path = args.checkpoint or args.checkpoint_path
    if not checkpoint_path:
        parser.error("give a checkpoint: --checkpoint PATH (or PATH)")
    checkpoint = read_checkpoint(checkpoint_path)
    config = load_config(args.config) if args.config else None
    dataset_name = (config.dataset_name if config else checkpoint["config"]["dataset_name"])
    dataset = load_dataset(ensure_dataset(dataset_name, args.source))
    model, config = model_from_checkpoint(checkpoint, config, dataset.num_items, checkpoint_path)
    model = model.to(resolve_device(args.device))
    inputs, targets = ((dataset.test_input, dataset.test_target) if args.split == "test"
                       else (dataset.val_input, dataset.val_target))
    started = time.perf_counter()
    metrics = evaluate(model, inputs, targets, config.metrics, config.recommendation_limit,
                       config.filter_rated, config.eval_batch_size)
    seconds = time.perf_counter() - started
    for name, value in metrics.items():
        print(f"{name}\t{value:.4f}")
    print(f"({len(targets)} {args.split} users, {seconds:.2f}s)")
    if args.output:
        result = {"checkpoint": str(checkpoint_path), "dataset": dataset_name, "split": args.split,
                  "users": len(targets), "metrics": metrics}
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)
