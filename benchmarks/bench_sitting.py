"""One sitting of the step comparison that docs/performance.md tabulates per machine: rounds of the official port's
way of computing a step (bench_train.py --paper-way) and of this repository's step of a config, alternating, each in
a fresh process. Where the CPU has native bf16 the config is also timed in float32 (bf16_scores=false), the only
arithmetic a CPU without it has. Each measurement prints its JSON line as it ends; a summary line closes, with each
round's speed-up: the port's median step over the config's from the same round, minutes apart (these machines drift,
so figures from different sittings are not compared). The port's way needs about 8 GB of memory on ML-1M.

    python3 benchmarks/bench_sitting.py --source /path/to/ml-1m.txt --rounds 2
"""
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from common import add_dataset_options, json_lines, timed
from eval_utils import has_native_bf16
from utils import CommandLineParser, machine_description, run_cli, whole_number_at_least


def variants(native_bf16: bool) -> dict[str, list[str]]:
    """The config's settings timed against the port: as shipped, and in float32 where that differs."""
    named = {"as shipped": []}
    if native_bf16:
        named["float32"] = ["--set", "bf16_scores=false"]
    return named


def speed_ups(paper_way: list[float], steps: list[float]) -> list[float]:
    """Round by round, the port's median step over the config's."""
    return [round(paper / step, 1) for paper, step in zip(paper_way, steps)]


def main() -> None:
    parser = CommandLineParser(__doc__)
    parser.add_argument("--config", default="config_ml1m.py", help="the config whose step is timed")
    count = whole_number_at_least(1)
    parser.add_argument("--rounds", type=count, default=2, help="rounds of the port's step and the config's")
    parser.add_argument("--paper-way-steps", type=count, default=3,
                        help="timed steps of the port's way a round, after one untimed (each takes seconds)")
    parser.add_argument("--steps", type=count, default=10, help="timed steps of the config a round, after two")
    parser.add_argument("--logs", help="folder for each measurement's output (default: a temporary one)")
    add_dataset_options(parser)
    args = parser.parse_args()
    logs = Path(args.logs or tempfile.mkdtemp(prefix="gsasrec-sitting-"))
    logs.mkdir(parents=True, exist_ok=True)
    dataset = (["--synthetic", "--num-items", str(args.num_items), "--num-users", str(args.num_users)]
               if args.synthetic else ["--source", args.source] if args.source else [])
    bench = [sys.executable, "benchmarks/bench_train.py", "--config", args.config, *dataset]
    measurements = {"paper way": [*bench, "--paper-way", "--steps", str(args.paper_way_steps), "--warmup", "1"]}
    measurements.update({name: [*bench, *settings, "--steps", str(args.steps), "--warmup", "2"]
                         for name, settings in variants(has_native_bf16(torch.device("cpu"))).items()})
    medians: dict[str, list[float]] = {name: [] for name in measurements}
    for round_number in range(1, args.rounds + 1):
        for name, command in measurements.items():
            log = logs / f"round{round_number}-{name.replace(' ', '-')}.log"
            status, _, output = timed(command, log)
            reports = json_lines(output)
            if status != 0 or not reports:
                tail = output.strip().splitlines()[-1:] or ["no output"]
                sys.exit(f"error: {name} failed in round {round_number} ({tail[0]}); its output is in {log}")
            figures = reports[-1]
            medians[name].append(figures["median_s"])
            print(json.dumps({"round": round_number, "measured": name, **figures}), flush=True)
    paper_way = medians.pop("paper way")
    summary = {"benchmark": "sitting", "config": args.config, "rounds": args.rounds,
               "machine": machine_description(torch.device("cpu")), "paper_way_median_s": paper_way}
    for name, steps in medians.items():
        of_medians = speed_ups([statistics.median(paper_way)], [statistics.median(steps)])[0]
        summary[name] = {"median_s": steps, "speed_up": speed_ups(paper_way, steps), "speed_up_of_medians": of_medians}
    print(json.dumps(summary))


if __name__ == "__main__":
    run_cli(main)
