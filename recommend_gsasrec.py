"""Top-k recommendations from a trained checkpoint, in the ids of the user's own log; or the model as an ONNX graph.

  recommend_gsasrec.py CHECKPOINT --output top.csv (or top.parquet)
writes the top --k items for every user of the checkpoint's dataset, after the user's whole known history (the
training, validation and test items), or for every user of --histories FILE (a CSV, TSV or Parquet log in the raw
ids of the log the dataset was prepared from; items the dataset does not know are counted and skipped). Rows:
user_id, rank (1..k), item_id, score (the model's logit) and title where the dataset's items.tsv has titles, with
the raw ids of users.tsv and items.tsv (datasets/prepare_dataset.py), or the dataset's own ids where it has none
(ML-1M). Items of the history are excluded unless --include-seen, so a user who has seen nearly the whole
catalogue can get fewer than k rows. Users are scored and written a batch at a time, so memory does not grow with
their number, and the file appears under its name only once complete.

  recommend_gsasrec.py CHECKPOINT --export-onnx model.onnx
writes an ONNX graph with a dynamic batch axis: left-padded item ids (batch, sequence_length) int64 in, the top --k
item ids (int64) and scores (float32) out, the input's own items excluded (docs/serving.md).
"""
import importlib
import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow
import pyarrow.csv
import pyarrow.parquet
import torch
from torch import nn
from tqdm import tqdm

from config import GSASRecError
from dataset_utils import (RawIds, Sequences, encode_ids, ensure_dataset, file_separator, load_dataset,
                           offsets_from_lengths, parse_times, read_columns, read_raw_ids, time_order)
from eval_utils import recommend_batched
from gsasrec import GSASRec
from utils import (CommandLineParser, atomic_write, load_config, model_from_checkpoint, output_file, read_checkpoint,
                   resolve_device, run_cli, whole_number_at_least)

OUTPUT_FORMATS = (".csv", ".parquet")
# Opset 17 has LayerNormalization as one operator and runs on onnxruntime releases of the last few years.
ONNX_OPSET = 17


def read_histories(path: Path, args, raw: RawIds) -> tuple[np.ndarray, Sequences]:
    """The log's users (in order of first appearance) with their histories in dataset ids, each ordered by time
    (equal times keep file order); items the dataset does not know are skipped and counted in one line."""
    columns = [args.user_col, args.item_col] + ([args.time_col] if args.time_col else [])
    if len(set(columns)) < len(columns):
        raise GSASRecError(f"the user, item and time columns must differ, got {columns}")
    frame = read_columns(path, columns, [args.user_col, args.item_col], file_separator(path, args.sep))
    users, raw_users = encode_ids(frame[args.user_col], "user")
    times = parse_times(frame[args.time_col]) if args.time_col else None
    raw_items = frame[args.item_col].astype(str)
    items = pd.Index(raw.items[1:].astype(str)).get_indexer(raw_items) + 1  # 0 where the dataset lacks the item
    order = time_order(users, times)
    order = order[items[order] > 0]
    if not len(order):
        raise GSASRecError(f"{path}: none of its {raw_items.nunique()} items is in the dataset's catalogue; was the "
                           "dataset prepared from another log?")
    counts = np.bincount(users[order], minlength=len(raw_users))
    unknown = raw_items[items == 0].unique()
    examples = f" (e.g. {', '.join(map(repr, unknown[:3]))})" if len(unknown) else ""
    print(f"{path}: {len(raw_users)} users, {len(frame)} events; skipped {int((items == 0).sum())} events of "
          f"{len(unknown)} items the dataset does not know{examples}; {int((counts == 0).sum())} user(s) left with no "
          "known item get no list")
    has_history = counts > 0
    return raw_users.to_numpy()[has_history], Sequences(items[order].astype(np.int32),
                                                        offsets_from_lengths(counts[has_history]))


def recommendation_table(users: np.ndarray, items: np.ndarray, scores: np.ndarray, raw: RawIds) -> pyarrow.Table:
    """One row per (user, rank) of top-k arrays (n, k), in raw ids; ranks scored -inf (no candidate left) dropped."""
    kept = np.isfinite(scores)
    columns = {"user_id": np.repeat(users, kept.sum(1)),
               "rank": np.broadcast_to(np.arange(1, items.shape[1] + 1, dtype=np.int32), items.shape)[kept],
               "item_id": raw.items[items[kept]], "score": scores[kept]}
    if raw.titles is not None:
        columns["title"] = raw.titles[items[kept]]
    return pyarrow.table(columns)


def write_recommendations(path: Path, model: GSASRec, users: np.ndarray, histories: Sequences, raw: RawIds,
                          k: int, exclude_seen: bool, batch_size: int, progress: bool) -> None:
    """Scores batch_size users at a time and appends their rows to the output, so neither the scores nor the rows of
    all users are held at once; written under a temporary name and renamed when complete."""
    def write(temporary: Path) -> None:
        writer = schema = None
        with tqdm(total=len(users), unit=" users", disable=not progress) as bar:
            for start in range(0, len(users), batch_size):
                rows = np.arange(start, min(start + batch_size, len(users)))
                items, scores = recommend_batched(model, histories.select(rows), k, filter_rated=exclude_seen)
                table = recommendation_table(users[rows], items, scores, raw)
                if writer is None:
                    schema = table.schema
                    writer = (pyarrow.parquet.ParquetWriter if path.suffix.lower() == ".parquet" else
                              pyarrow.csv.CSVWriter)(temporary, schema)
                writer.write_table(table.cast(schema))
                bar.update(len(rows))
        writer.close()
    atomic_write(path, write)


class TopItemsGraph(nn.Module):
    """What the ONNX graph computes: GSASRec's plain forward, the last position's scores against the output item
    table, the input's own ids (and id 0, the padding id) set to -inf, then the top k."""

    def __init__(self, model: GSASRec, k: int):
        super().__init__()
        self.model, self.k = model, k
        self.register_buffer("non_items", torch.tensor([[0, model.padding_id]]), persistent=False)

    def forward(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.model(item_ids)[:, -1] @ self.model.output_item_embeddings.T
        # An out-of-place scatter, not GSASRec.top_items' in-place index_put_: exported, that fails in onnxruntime.
        excluded = torch.cat([item_ids, self.non_items.expand(item_ids.shape[0], -1)], dim=1)
        top_scores, top_items = scores.scatter(1, excluded, float("-inf")).topk(self.k, dim=1)
        return top_items, top_scores


def optional_module(name: str):
    """onnx and onnxruntime, needed only to export and serve: missing, they stop the export in one line."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise GSASRecError(f"--export-onnx needs the package {name}: pip install {name}") from None


def example_windows(model: GSASRec, rows: int, seed: int = 0) -> torch.Tensor:
    """Left-padded windows of random items, the first one full and the others shorter and shorter."""
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(1, model.num_items + 1, (rows, model.sequence_length), generator=generator)
    lengths = torch.linspace(model.sequence_length, 1, rows).long()
    return windows.masked_fill(torch.arange(model.sequence_length) < model.sequence_length - lengths[:, None],
                               model.padding_id)


def without_bool_eye_like(graph, onnx) -> None:
    """The exporter writes torch.eye(dtype=bool) (the attention mask's diagonal) as a bool EyeLike, for which
    onnxruntime has no kernel: each EyeLike runs on int32 between two Casts instead."""
    types = {value.name: value.type.tensor_type.elem_type
             for value in onnx.shape_inference.infer_shapes(graph).graph.value_info}
    nodes = []
    for node in graph.graph.node:
        if node.op_type == "EyeLike":
            (source,), (target,) = node.input, node.output
            node.input[0], node.output[0] = f"{source}_int32", f"{target}_int32"
            nodes += [onnx.helper.make_node("Cast", [source], [node.input[0]], to=onnx.TensorProto.INT32), node,
                      onnx.helper.make_node("Cast", [node.output[0]], [target], to=types[target])]
        else:
            nodes.append(node)
    graph.graph.ClearField("node")
    graph.graph.node.extend(nodes)


def export_onnx(model: GSASRec, path: Path, k: int) -> None:
    """The ONNX graph of TopItemsGraph, checked against PyTorch in onnxruntime before it is written."""
    onnx, onnxruntime = optional_module("onnx"), optional_module("onnxruntime")
    graph = TopItemsGraph(model.cpu().eval(), k).eval()
    # The forward branches on whether the input has padding; the traced example has some, which gives the general
    # branch (a full window is the case whose mask hides nothing).
    example = example_windows(model, rows=2)
    exported = io.BytesIO()
    # The TorchScript exporter (dynamo=False): torch.export cannot follow that data-dependent branch, and it needs no
    # package beyond onnx. Its deprecation notice and the tracer's warning about that branch are expected.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), exported, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["item_ids"], output_names=["top_items", "top_scores"],
                          dynamic_axes={name: {0: "batch"} for name in ("item_ids", "top_items", "top_scores")})
    proto = onnx.load_from_string(exported.getvalue())
    without_bool_eye_like(proto, onnx)
    # What a client needs to build the input (docs/serving.md reads them from the session).
    onnx.helper.set_model_props(proto, {"padding_id": str(model.padding_id), "sequence_length":
                                        str(model.sequence_length), "num_items": str(model.num_items), "k": str(k)})
    onnx.checker.check_model(proto)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    check = example_windows(model, rows=5, seed=1)
    _, onnx_scores = session.run(None, {"item_ids": check.numpy()})
    with torch.no_grad():
        _, torch_scores = graph(check)
    if not np.allclose(onnx_scores, torch_scores.numpy(), rtol=1e-4, atol=1e-4):
        raise GSASRecError("the exported graph's scores differ from PyTorch's in onnxruntime "
                           f"(by up to {np.nanmax(np.abs(onnx_scores - torch_scores.numpy())):.2g})")
    atomic_write(path, lambda temporary: temporary.write_bytes(proto.SerializeToString()))


def parse_arguments():
    parser = CommandLineParser(__doc__)
    parser.add_argument("checkpoint", help="checkpoint file written by train_gsasrec.py")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--output", help="the recommendations: .csv or .parquet")
    what.add_argument("--export-onnx", metavar="PATH", help="write the model as an ONNX graph instead")
    parser.add_argument("--k", type=whole_number_at_least(1), default=10, help="items per user (default 10)")
    parser.add_argument("--include-seen", action="store_true", help="keep items of the history in the lists")
    parser.add_argument("--histories", metavar="FILE",
                        help="recommend for the users of this log (.csv, .tsv, .txt or .parquet, in raw ids) "
                             "instead of the dataset's")
    parser.add_argument("--user-col", default="user_id", help="--histories' user column (default user_id)")
    parser.add_argument("--item-col", default="item_id", help="--histories' item column (default item_id)")
    parser.add_argument("--time-col", help="--histories' event time (default: none, the file order)")
    parser.add_argument("--sep", help="--histories' column separator (default: ',' for .csv, tab for .tsv/.txt)")
    parser.add_argument("--batch-size", type=whole_number_at_least(1), default=1024,
                        help="users scored and written at a time (default 1024)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--config", help="config file; needed only for an official-port checkpoint")
    parser.add_argument("--source", help="path to ml-1m.txt when the ML-1M split must be prepared")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.export_onnx and args.histories:
        parser.error("--histories goes with --output")
    return args


def main() -> None:
    args = parse_arguments()
    output, onnx_output = output_file(args.output, "--output"), output_file(args.export_onnx, "--export-onnx")
    if output and output.suffix.lower() not in OUTPUT_FORMATS:
        raise GSASRecError(f"--output {output}: give a file ending in .csv or .parquet")
    device = resolve_device(args.device)
    config = load_config(args.config) if args.config else None
    checkpoint = read_checkpoint(args.checkpoint, config)
    if args.k > checkpoint["num_items"]:
        raise GSASRecError(f"--k {args.k} is more than the catalogue's {checkpoint['num_items']} items")
    if onnx_output:
        model, config = model_from_checkpoint(checkpoint, config, path=args.checkpoint)
        export_onnx(model, onnx_output, args.k)
        print(f"Wrote {onnx_output}: item_ids (batch, {config.sequence_length}) int64 left-padded with "
              f"{model.padding_id} -> top_items, top_scores (batch, {args.k})")
        return
    dataset_name = config.dataset_name if config else checkpoint["config"]["dataset_name"]
    directory = ensure_dataset(dataset_name, args.source)
    dataset = load_dataset(directory)
    model, config = model_from_checkpoint(checkpoint, config, dataset.num_items, args.checkpoint)
    model = model.to(device).eval()
    raw = read_raw_ids(directory, len(dataset.test_input), dataset.num_items)
    if args.histories:
        users, histories = read_histories(Path(args.histories), args, raw)
    else:
        users, histories = raw.users[1:], dataset.whole_histories()
    write_recommendations(output, model, users, histories, raw, args.k, not args.include_seen, args.batch_size,
                          not args.no_progress)
    print(f"Wrote the top {args.k} items of {len(users)} users to {output}"
          f"{'' if args.include_seen else ' (seen items excluded)'}")


if __name__ == "__main__":
    run_cli(main)
