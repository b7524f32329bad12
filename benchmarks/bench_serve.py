"""Serving top-k lists: onnxruntime against PyTorch, median seconds for 1 history and for 512 histories, printed as
one JSON line.

The histories are ML-1M test inputs (their last sequence_length items, left-padded). onnxruntime runs the graph of
recommend_gsasrec.py --export-onnx; PyTorch runs the same module eagerly (pytorch_graph), and the repository's own
ranking (pytorch_recommend_batched: padding cut away, the last position only). Both libraries get the same threads.
"""
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import add_dataset_options, benchmark_dataset, report

from dataset_utils import Sequences, offsets_from_lengths
from eval_utils import recommend_batched
from recommend_gsasrec import TopItemsGraph, export_onnx
from utils import CommandLineParser, load_model, run_cli, whole_number_at_least

REPOSITORY = Path(__file__).resolve().parents[1]


def median_seconds(run, runs: int) -> float:
    """The median of `runs` timed calls, after one untimed call that warms caches and allocators."""
    run()
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return round(float(np.median(seconds)), 5)


@torch.inference_mode()
def serving_seconds(session, graph: TopItemsGraph, windows: np.ndarray, runs: int) -> dict[str, float]:
    """Median seconds of the three ways to the top-k lists of the same left-padded windows."""
    is_item = windows != graph.model.padding_id
    histories = Sequences(windows[is_item], offsets_from_lengths(is_item.sum(1)))
    return {"onnxruntime": median_seconds(lambda: session.run(None, {"item_ids": windows}), runs),
            "pytorch_graph": median_seconds(lambda: graph(torch.from_numpy(windows)), runs),
            "pytorch_recommend_batched": median_seconds(lambda: recommend_batched(graph.model, histories, graph.k),
                                                        runs)}


def main() -> None:
    parser = CommandLineParser(__doc__)
    parser.add_argument("--checkpoint", default=str(next((REPOSITORY / "pre_trained" / "config_ml1m").glob("*.pt"))),
                        help="default: the shipped config_ml1m checkpoint")
    parser.add_argument("--k", type=whole_number_at_least(1), default=10)
    parser.add_argument("--threads", type=whole_number_at_least(1), default=2)
    parser.add_argument("--runs", type=whole_number_at_least(1), default=5,
                        help="timed runs of 512 histories (of 1 history: ten times as many)")
    add_dataset_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset, dataset_name = benchmark_dataset(args)
    model, _ = load_model(args.checkpoint, device="cpu")
    graph = TopItemsGraph(model, args.k).eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    with tempfile.TemporaryDirectory() as folder:
        export_onnx(model, Path(folder) / "model.onnx", args.k)
        session = onnxruntime.InferenceSession(str(Path(folder) / "model.onnx"), options,
                                               providers=["CPUExecutionProvider"])
    median_s = {}
    for count, runs in ((1, 10 * args.runs), (512, args.runs)):
        windows = dataset.test_input.windows(np.arange(count), model.sequence_length, model.padding_id).astype(np.int64)
        median_s[f"{count}_histories"] = serving_seconds(session, graph, windows, runs)
    report(benchmark="serve", dataset=dataset_name, checkpoint=Path(args.checkpoint).parent.name, k=args.k,
           median_s=median_s, runs={"1_histories": 10 * args.runs, "512_histories": args.runs},
           onnxruntime=onnxruntime.__version__, device="cpu")


if __name__ == "__main__":
    run_cli(main)
