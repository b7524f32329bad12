"""Seconds per training step of a config (default: the ML-1M gSASRec config), printed as one JSON line. With
per_position_scoring="auto" the steps of its trial are untimed, and the path it chose and its timings are printed.

--paper-way times the step as the official port computes it (per-position negatives gathered into a
(batch, L, k + 1, E) tensor, the loss in float64, one padded pass) with this repository's model: a baseline
for machines where the official port itself was not measured."""
import time

import numpy as np
import torch

from common import add_dataset_options, benchmark_dataset, report
from dataset_utils import training_batch
from eval_utils import has_native_bf16
from gsasrec import gbce_beta
from paper_way import paper_way_loss
from train_gsasrec import TrainingObjective, build_optimizer, sample_negatives
from utils import CommandLineParser, apply_overrides, build_model, load_config, resolve_device, run_cli


def main() -> None:
    parser = CommandLineParser(__doc__)
    parser.add_argument("--config", default="config_ml1m.py")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, as train_gsasrec.py --set (e.g. negative_sampling=per_sequence, "
                             "bf16=true, bf16_scores=false, engine=reference)")
    parser.add_argument("--paper-way", action="store_true",
                        help="the official port's way of computing the loss (about 10 GB of memory on ML-1M)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device")
    add_dataset_options(parser)
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config), args.set)
    device = resolve_device(args.device)
    dataset, dataset_name = benchmark_dataset(args)
    torch.manual_seed(0)
    model = build_model(config, dataset.num_items).to(device).train()
    optimizer = build_optimizer(model, config, in_backward=True)
    generator = torch.Generator(device=device).manual_seed(0)
    beta = gbce_beta(config.negs_per_pos, dataset.num_items, config.gbce_t)
    objective = TrainingObjective(model, config, beta, optimizer)
    rng = np.random.RandomState(0)
    users = np.flatnonzero(dataset.train.lengths >= 2)
    seconds, step = [], 0
    scoring = None if args.paper_way else objective.scoring
    while len(seconds) < args.steps:
        started = time.perf_counter()
        batch = training_batch(dataset, rng.choice(users, config.train_batch_size, replace=False), config,
                               generator).to(device)
        if args.paper_way:
            negatives = torch.randint(1, dataset.num_items + 1, (*batch[:, 1:].shape, config.negs_per_pos),
                                      generator=generator, device=device)
            loss = paper_way_loss(model, batch, negatives, beta)
        else:
            loss = objective(batch, sample_negatives(batch, config, dataset.num_items, generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step += 1
        # Warm-up steps, and per_position_scoring="auto"'s trial steps, are not timed.
        if step > args.warmup and (scoring is None or scoring.path is not None):
            seconds.append(time.perf_counter() - started)
    extra = {"peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)} if device.type == "cuda" else {}
    report(benchmark="train_step_paper_way" if args.paper_way else "train_step", dataset=dataset_name,
           config=args.config, overrides=args.set, engine=config.engine,
           negative_sampling="per_position" if args.paper_way else config.negative_sampling,
           bf16=config.bf16 and has_native_bf16(device),
           bf16_scores=config.bf16_scores and has_native_bf16(device), batch_size=config.train_batch_size,
           negs_per_pos=config.negs_per_pos, scoring_path=scoring and scoring.path,
           scoring_trial_us_per_target=scoring and scoring.microseconds_per_target(),
           median_s=round(float(np.median(seconds)), 4), min_s=round(min(seconds), 4), steps=args.steps,
           device=str(device), **extra)


if __name__ == "__main__":
    run_cli(main)
