"""Evaluates a gSASRec checkpoint on the test split: full-catalogue ranking, ir_measures metrics.

The checkpoint carries its config, so --config is optional; when given, it must fit the checkpoint. The official
port's checkpoints (bare state dicts) carry none and need --config; --write-official writes any checkpoint in
that format, for the official port's own evaluation script.
"""
import json
import time
from pathlib import Path

from config import GSASRecError
from dataset_utils import ensure_dataset, load_dataset
from eval_utils import plot_reliability_diagrams, ranking_metrics, recommend_batched, top1_calibration
from utils import (CommandLineParser, atomic_write, checkpoint_config, load_config, model_from_checkpoint, output_file,
                   read_checkpoint, resolve_device, run_cli, whole_number_at_least, write_official_checkpoint)


def print_calibration(report: dict) -> None:
    print(f"mean predicted top-1 probability\t{report['mean_top1_probability']:.4f}")
    print(f"observed R@1\t{report['R@1']:.4f}")
    print(f"overconfidence (predicted / observed)\t{report['overconfidence']:.2f}")
    print(f"expected calibration error ({len(report['bins'])} equal-mass bins)\t{report['ece']:.4f}")
    for b in report["bins"]:
        print(f"  predicted {b['predicted']:.4f}  observed {b['observed']:.4f}  users {b['count']}")


def main() -> None:
    parser = CommandLineParser(__doc__)
    parser.add_argument("checkpoint_path", nargs="?", help="checkpoint file (same as --checkpoint)")
    parser.add_argument("--checkpoint", help="checkpoint file written by train_gsasrec.py")
    parser.add_argument("--config", help="config file; optional, the checkpoint holds its own")
    parser.add_argument("--split", choices=["test", "val"], default="test", help="which split to score (default: test)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--source", help="path to ml-1m.txt when the ML-1M split must be prepared")
    parser.add_argument("--output", help="also write the metrics as JSON to this file")
    parser.add_argument("--calibration", action="store_true",
                        help="report how calibrated the top-1 item's probability is (sigmoid(score) for gBCE, the "
                             "softmax over the candidates for softmax losses): mean predicted probability vs R@1, "
                             "overconfidence factor, expected calibration error")
    parser.add_argument("--bins", type=whole_number_at_least(1), default=10,
                        help="equal-mass bins for the calibration error (default 10)")
    parser.add_argument("--plot", help="with --calibration: save the reliability diagram to this PNG")
    parser.add_argument("--write-official", metavar="PATH",
                        help="instead of evaluating, write the weights as the official port's bare state dict")
    args = parser.parse_args()
    if args.plot and not args.calibration:
        parser.error("--plot needs --calibration")
    if args.write_official and (args.output or args.calibration):
        parser.error("--write-official only converts the checkpoint; it writes no metrics (drop --output, "
                     "--calibration)")
    if args.checkpoint and args.checkpoint_path:
        parser.error("give the checkpoint once: --checkpoint PATH or PATH")
    checkpoint_path = args.checkpoint or args.checkpoint_path
    if not checkpoint_path:
        parser.error("give a checkpoint: --checkpoint PATH (or PATH)")
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        parser.error(f"--plot {args.plot}: the reliability diagram is a PNG; give a name ending in .png")
    if args.output and args.plot and Path(args.output).resolve() == Path(args.plot).resolve():
        parser.error("--output and --plot name the same file")
    reads = tuple(Path(path) for path in (checkpoint_path, args.config) if path)
    output, plot = output_file(args.output, "--output", reads), output_file(args.plot, "--plot", reads)
    official_output = output_file(args.write_official, "--write-official", reads)
    device = resolve_device(args.device)
    config = load_config(args.config) if args.config else None
    checkpoint = read_checkpoint(checkpoint_path, config)
    if official_output:
        write_official_checkpoint(checkpoint, official_output)
        print(f"Wrote {args.write_official} (official-port format: evaluate it with its config)")
        return
    dataset_name = (config or checkpoint_config(checkpoint, checkpoint_path)).dataset_name
    dataset = load_dataset(ensure_dataset(dataset_name, args.source))
    model, config = model_from_checkpoint(checkpoint, config, dataset.num_items, checkpoint_path)
    model = model.to(device)
    made = checkpoint.get("training")
    if made:
        print(f"trained {made['steps']} steps in {made['seconds'] / 60:.1f} min on {made['device']} "
              f"({made['threads']} threads, torch {made['torch']}, {made['world_size']} process(es))")
    inputs, targets = ((dataset.test_input, dataset.test_target) if args.split == "test"
                       else (dataset.val_input, dataset.val_target))
    if args.calibration and args.bins > len(targets):
        raise GSASRecError(f"--bins {args.bins}: more bins than the {len(targets)} {args.split} users")
    softmax_probabilities = args.calibration and config.predicts_softmax
    started = time.perf_counter()
    recommended, scores = recommend_batched(model, inputs, config.recommendation_limit, config.filter_rated,
                                            config.eval_batch_size, log_softmax=softmax_probabilities)
    metrics = ranking_metrics(recommended, targets, config.metrics)
    seconds = time.perf_counter() - started
    for name, value in metrics.items():
        print(f"{name}\t{value:.4f}")
    print(f"({len(targets)} {args.split} users, {seconds:.2f}s)")
    result = {"checkpoint": str(checkpoint_path), "dataset": dataset_name, "split": args.split,
              "users": len(targets), "metrics": metrics, "training": made}
    if args.calibration:
        result["calibration"] = top1_calibration(recommended, scores, targets, args.bins, softmax_probabilities)
        print_calibration(result["calibration"])
        if plot:
            atomic_write(plot, lambda temporary: plot_reliability_diagrams(
                {Path(checkpoint_path).name[:40]: result["calibration"]}, temporary))
            print(f"Reliability diagram saved to {plot}")
    if output:
        atomic_write(output, lambda temporary: temporary.write_text(json.dumps(result, indent=2) + "\n"))


if __name__ == "__main__":
    run_cli(main)
