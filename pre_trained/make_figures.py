"""Draws the figures of pre_trained/README.md from the training logs and the committed checkpoints.

  python3 pre_trained/make_figures.py learning-curves --log NAME=PATH/log.jsonl ... --output curves.png
  python3 pre_trained/make_figures.py calibration --checkpoint NAME=PATH.pt ... --output calibration.png
"""
import gzip
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset_utils import ensure_dataset, load_dataset  # noqa: E402
from eval_utils import plot_reliability_diagrams, ranking_metrics, recommend_batched, top1_calibration  # noqa: E402
from utils import CommandLineParser, load_model, run_cli  # noqa: E402


def named_paths(values: list[str]) -> dict[str, str]:
    """NAME=PATH pairs; the last "=" separates them, so names like "t=0.75" work."""
    return dict(value.rsplit("=", 1) for value in values)


def read_log(path: str) -> list[dict]:
    """The records of a log.jsonl as train_gsasrec.py writes it, or of its gzipped copy (.jsonl.gz)."""
    text = gzip.decompress(Path(path).read_bytes()).decode() if path.endswith(".gz") else Path(path).read_text()
    return [json.loads(line) for line in text.splitlines()]


def learning_curves(logs: dict[str, str], output: str, target: float | None, by_steps: bool = False,
                    test_only: bool = False, mark_picks: bool = False, y_min: float | None = None,
                    val_metric: str = "nDCG@10", pick_from_step: int = 0):
    """Validation and test nDCG@10 against training wall-clock hours (or steps), one colour per run. Test
    metrics are drawn where the log has them (a run may have been resumed without --log-test-metrics).
    test_only leaves out the validation curves (512 users, noisy), for figures comparing many runs;
    mark_picks puts a dot on each test curve at the epoch the run keeps (the first highest validation
    val_metric from pick_from_step on, the config's selection_start_step), to show what the selection costs
    against the curve; y_min cuts off the climb below it, to see
    the differences at the top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(8, 5))
    for (name, path), colour in zip(logs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        records = read_log(path)
        x = np.array([record["step"] if by_steps else record["time_s"] / 3600 for record in records])
        if not test_only:
            axis.plot(x, [record["val_nDCG@10"] for record in records], color=colour, alpha=0.45,
                      label=f"{name}: validation")
        tested = [index for index, record in enumerate(records) if "test_nDCG@10" in record]
        if tested:
            axis.plot(x[tested], [records[index]["test_nDCG@10"] for index in tested], color=colour,
                      label=f"{name}: test")
        pick = int(np.argmax([record[f"val_{val_metric}"] if record["step"] >= pick_from_step else -np.inf
                              for record in records]))
        if mark_picks and "test_nDCG@10" in records[pick]:
            axis.plot([x[pick]], [records[pick]["test_nDCG@10"]], color=colour, marker="o", markersize=9,
                      markeredgecolor="black", linestyle="none", zorder=5, label=f"{name}: validation pick")
    if target:
        axis.axhline(target, color="black", linestyle="--", linewidth=1, label=f"paper's test nDCG@10 {target}")
    axis.set(xlabel="training steps" if by_steps else "training wall-clock (hours)", ylabel="nDCG@10",
             title="ML-1M learning curves")
    if y_min is not None:
        axis.set_ylim(bottom=y_min)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    return figure


def calibration(checkpoints: dict[str, str], output: str, bins: int) -> None:
    """Test-split reliability diagrams of several checkpoints side by side; prints each report."""
    reports = {}
    for name, path in checkpoints.items():
        model, config = load_model(path, device="cpu")
        dataset = load_dataset(ensure_dataset(config.dataset_name))
        items, scores = recommend_batched(model, dataset.test_input, config.recommendation_limit,
                                          config.filter_rated, config.eval_batch_size,
                                          log_softmax=config.predicts_softmax)
        reports[name] = top1_calibration(items, scores, dataset.test_target, bins, config.predicts_softmax)
        reports[name]["nDCG@10"] = ranking_metrics(items, dataset.test_target, ["nDCG@10"])["nDCG@10"]
        print(json.dumps({"name": name, **{k: v for k, v in reports[name].items() if k != "bins"}}))
    plot_reliability_diagrams(reports, output)


def main() -> None:
    parser = CommandLineParser(__doc__)
    parser.add_argument("figure", choices=["learning-curves", "calibration"])
    parser.add_argument("--log", action="append", default=[],
                        help="NAME=path/to/log.jsonl or log.jsonl.gz (learning curves)")
    parser.add_argument("--checkpoint", action="append", default=[], help="NAME=path/to/checkpoint.pt (calibration)")
    parser.add_argument("--target", type=float, default=0.1726, help="a horizontal line on the learning curves")
    parser.add_argument("--steps", action="store_true", help="learning curves against steps, not wall-clock")
    parser.add_argument("--test-only", action="store_true", help="learning curves of test nDCG@10 alone")
    parser.add_argument("--mark-picks", action="store_true",
                        help="a dot on each test curve where the highest validation --val-metric was")
    parser.add_argument("--val-metric", default="nDCG@10", help="the metric the runs selected on (for --mark-picks)")
    parser.add_argument("--pick-from-step", type=int, default=0,
                        help="the runs' selection_start_step (for --mark-picks)")
    parser.add_argument("--y-min", type=float, help="lowest nDCG@10 shown on the learning curves")
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--output", required=True, help="PNG file")
    args = parser.parse_args()
    if args.figure == "learning-curves":
        learning_curves(named_paths(args.log), args.output, args.target, args.steps, args.test_only,
                        args.mark_picks, args.y_min, args.val_metric, args.pick_from_step)
    else:
        calibration(named_paths(args.checkpoint), args.output, args.bins)
    print(f"Saved {args.output}")


if __name__ == "__main__":
    run_cli(main)
