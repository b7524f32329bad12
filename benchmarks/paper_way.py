"""The official port's way of computing the gBCE loss and the evaluation, with this repository's model: the
baselines of bench_train.py / bench_eval.py --paper-way where the port itself was not measured. (The tests' plain
references are in tests/references.py.) Imported after common, which puts the repository on the path."""
import numpy as np
import torch

from dataset_utils import Sequences
from eval_utils import aggregate_ir_measures
from gsasrec import GSASRec


def explicit_gbce(positive: torch.Tensor, negative: torch.Tensor, beta: float) -> torch.Tensor:
    """The paper's gBCE (Eq. 11), term by term, in float64: positive (n,), negative (n, k)."""
    positive, negative = positive.double(), negative.double()
    terms = torch.log(torch.sigmoid(positive) ** beta) + torch.log(1 - torch.sigmoid(negative)).sum(-1)
    return (-terms / (negative.shape[-1] + 1)).mean()


def paper_way_loss(model: GSASRec, batch: torch.Tensor, negatives: torch.Tensor, beta: float) -> torch.Tensor:
    """gBCE the slow way, on given negatives (batch, width - 1, k): the embeddings of each position's positive and
    k negatives gathered, scored by a batched dot product, the explicit formula over non-padded positions."""
    input, labels = batch[:, :-1], batch[:, 1:]
    hidden = model(input)
    candidates = model.output_item_embeddings[torch.cat([labels.unsqueeze(-1), negatives], dim=-1)]
    scores = torch.einsum("ble,blke->blk", hidden, candidates)
    is_target = input != model.padding_id
    return explicit_gbce(scores[..., 0][is_target], scores[..., 1:][is_target], beta)


@torch.no_grad()
def paper_way_evaluate(model: GSASRec, inputs: Sequences, targets: np.ndarray, metrics: list[str], limit: int,
                       batch_size: int) -> dict[str, float]:
    """Full padded forward passes, then per-user Python loops over rated items, recommendations and qrels."""
    device = next(model.parameters()).device
    windows = inputs.windows(np.arange(len(inputs)), model.sequence_length, model.padding_id)
    run, qrels = {}, {}
    for start in range(0, len(inputs), batch_size):
        batch = torch.from_numpy(windows[start:start + batch_size].astype(np.int64)).to(device)
        scores = model(batch)[:, -1] @ model.output_item_embeddings.T
        scores[:, [0, model.padding_id]] = float("-inf")
        for row in range(len(batch)):
            for item in inputs.items[inputs.offsets[start + row]:inputs.offsets[start + row + 1]]:
                scores[row, int(item)] = float("-inf")
        top_scores, top_items = scores.topk(limit, dim=1)
        for row in range(len(batch)):
            user = str(start + row)
            qrels[user] = {str(int(targets[start + row])): 1}
            run[user] = {str(int(item)): float(score) for item, score in zip(top_items[row], top_scores[row])}
    return aggregate_ir_measures(metrics, qrels, run)
