"""Seconds to evaluate the full test split (every user, full catalogue, metrics), printed as one JSON line.

--paper-way times evaluation as the official port does it (every user padded to the full sequence length,
rated items masked and the run built for ir_measures in Python loops, item by item) with this repository's
model: a baseline for machines where the official port itself was not measured."""
import time

import numpy as np
import torch

from common import add_dataset_options, benchmark_dataset, report
from eval_utils import evaluate
from paper_way import paper_way_evaluate
from utils import (CommandLineParser, build_model, load_config, model_from_checkpoint, read_checkpoint, resolve_device,
                   run_cli)


def main() -> None:
    parser = CommandLineParser(__doc__)
    parser.add_argument("--config", default="config_ml1m.py")
    parser.add_argument("--checkpoint", help="a trained checkpoint (default: a randomly initialised model)")
    parser.add_argument("--paper-way", action="store_true", help="the official port's way of evaluating")
    parser.add_argument("--runs", type=int, default=5, help="timed evaluations")
    parser.add_argument("--device")
    add_dataset_options(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dataset, dataset_name = benchmark_dataset(args)
    if args.checkpoint:
        model, config = model_from_checkpoint(read_checkpoint(args.checkpoint), num_items=dataset.num_items)
    else:
        config = load_config(args.config)
        torch.manual_seed(0)
        model = build_model(config, dataset.num_items)
    model = model.to(device).eval()
    seconds = []
    for run in range(args.runs + 1):
        started = time.perf_counter()
        if args.paper_way:
            metrics = paper_way_evaluate(model, dataset.test_input, dataset.test_target, config.metrics,
                                         config.recommendation_limit, config.eval_batch_size)
        else:
            metrics = evaluate(model, dataset.test_input, dataset.test_target, config.metrics,
                               config.recommendation_limit, config.filter_rated, config.eval_batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if run:
            seconds.append(time.perf_counter() - started)
    report(benchmark="evaluate_test_paper_way" if args.paper_way else "evaluate_test", dataset=dataset_name,
           users=len(dataset.test_target),
           median_s=round(float(np.median(seconds)), 4), min_s=round(min(seconds), 4), runs=args.runs,
           metrics=metrics, device=str(device))


if __name__ == "__main__":
    run_cli(main)
