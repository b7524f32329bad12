"""The GPU check, one command for a lent GPU machine: the CUDA tests, a training step and a test evaluation timed,
then config_ml1m.py trained to its end and its best checkpoint evaluated on the test users. Each part prints its
JSON line as it ends, and a summary line closes. Where there is no CUDA device it says so and exits with status 1.

    python3 benchmarks/bench_gpu.py --source /path/to/ml-1m.txt   # or GSASREC_ML1M_SOURCE set
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

from common import json_lines, timed
from utils import CommandLineParser, run_cli


def main() -> None:
    parser = CommandLineParser(__doc__)
    parser.add_argument("--source", help="path to ml-1m.txt (else GSASREC_ML1M_SOURCE, else downloaded)")
    parser.add_argument("--config", default="config_ml1m.py", help="the config trained to its end")
    parser.add_argument("--output", help="folder for the run and the logs (default: a temporary one)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu", "error": "no CUDA device"}))
        sys.exit(1)
    output = Path(args.output or tempfile.mkdtemp(prefix="gsasrec-gpu-"))
    output.mkdir(parents=True, exist_ok=True)
    source = ["--source", args.source] if args.source else []
    python = sys.executable
    summary = {"benchmark": "gpu", "device_name": torch.cuda.get_device_name(), "torch": torch.__version__,
               "config": args.config}

    status, seconds, text = timed([python, "-m", "pytest", "-q", "tests", "-k", "cuda"], output / "tests.log")
    summary["cuda_tests"] = {"status": status, "seconds": seconds, "summary": text.strip().splitlines()[-1:]}
    print(json.dumps({"benchmark": "cuda_tests", **summary["cuda_tests"]}), flush=True)

    for name, command in (("train_step", ["benchmarks/bench_train.py", "--config", args.config]),
                          ("test_evaluation", ["benchmarks/bench_eval.py", "--config", args.config])):
        status, _, text = timed([python, *command, "--device", "cuda", *source], output / f"{name}.log")
        reports = json_lines(text)
        summary[name] = reports[-1] if status == 0 and reports else {"status": status}
        print(json.dumps(summary[name]), flush=True)

    run_dir = output / "run"
    status, seconds, text = timed([python, "train_gsasrec.py", f"--config={args.config}", "--device", "cuda",
                                   "--run-dir", str(run_dir), "--fresh", "--no-progress", *source],
                                  output / "training.log")
    best = sorted(run_dir.glob("gsasrec-*.pt"))
    training = {"status": status, "wall_s": seconds, "best_checkpoint": best[-1].name if best else None}
    if status == 0 and best:
        metrics = output / "test_metrics.json"
        status, _, _ = timed([python, "evaluate_gsasrec.py", str(best[-1]), "--device", "cuda", "--output",
                              str(metrics), *source], output / "evaluation.log")
        training["test"] = json.loads(metrics.read_text()) if status == 0 else {"status": status}
    summary["training"] = training
    print(json.dumps({"benchmark": "training", **training}), flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_cli(main)
