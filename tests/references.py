"""Plain references the tests hold the project's code to: the paper's losses written out term by term, its blocks
written out position by position. Slow on purpose; the project never imports them."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config import GSASRecExperimentConfig
from gsasrec import GSASRec, LiGRBlock, SelfAttentionBlock


def random_batch(num_items: int, length: int, rows: int = 70, seed: int = 0) -> torch.Tensor:
    """rows left-padded training windows (rows, length + 1) of 2..length + 1 random items."""
    rng = np.random.RandomState(seed)
    batch = torch.full((rows, length + 1), num_items + 1)
    for row, items in enumerate(rng.randint(2, length + 2, rows)):
        batch[row, length + 1 - items:] = torch.from_numpy(rng.randint(1, num_items + 1, items))
    return batch


def explicit_gbce(positive: torch.Tensor, negative: torch.Tensor, beta: float) -> torch.Tensor:
    """The paper's gBCE, term by term in float64: -1/(k+1) (log sigmoid(s+)^beta + sum_i log(1 - sigmoid(s-_i)))
    averaged over positions; positive (n,), negative (n, k)."""
    positive, negative = positive.double(), negative.double()
    terms = torch.log(torch.sigmoid(positive) ** beta) + torch.log(1 - torch.sigmoid(negative)).sum(-1)
    return (-terms / (negative.shape[-1] + 1)).mean()


def per_position_negatives(batch: torch.Tensor, negatives: torch.Tensor, config: GSASRecExperimentConfig,
                           padding_id: int) -> torch.Tensor:
    """train_gsasrec.sample_negatives' draw laid out as (rows, L, k): a row's draw at each of its positions, or one
    draw per target in row-major order (padded positions get item 1, never read)."""
    rows, length = batch.shape[0], batch.shape[1] - 1
    if config.negative_sampling == "per_sequence":
        return negatives[:, None, :].expand(rows, length, -1)
    laid_out = torch.ones(rows, length, negatives.shape[1], dtype=torch.int64, device=batch.device)
    laid_out[batch[:, :-1] != padding_id] = negatives
    return laid_out


def formula_loss(model: GSASRec, batch: torch.Tensor, negatives: torch.Tensor | None,
                 config: GSASRecExperimentConfig, beta: float) -> torch.Tensor:
    """The config's loss as the paper writes it: one padded pass, each target's positive and negatives gathered as
    (n, k, E) embeddings; gBCE term by term, the softmaxes through F.cross_entropy (the sampled one with each
    negative's logit raised by log(N / k) under the log-Q correction)."""
    input, labels = batch[:, :-1], batch[:, 1:]
    is_target = input != model.padding_id
    hidden = model(input)[is_target]
    table = model.output_item_embeddings
    if config.loss == "softmax":
        return F.cross_entropy(hidden @ table[1:model.num_items + 1].T, labels[is_target] - 1)
    laid_out = per_position_negatives(batch, negatives, config, model.padding_id)
    positive = (hidden * table[labels[is_target]]).sum(-1)
    negative = (hidden.unsqueeze(1) * table[laid_out[is_target]]).sum(-1)
    if config.loss == "gbce":
        return explicit_gbce(positive, negative, beta)
    if config.logq_correction:
        negative = negative + math.log(model.num_items / config.negs_per_pos)
    logits = torch.cat([positive[:, None], negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.int64, device=logits.device))


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-8) * norm.weight + norm.bias


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_item: torch.Tensor, heads: int
           ) -> torch.Tensor:
    """Causal multi-head attention position by position: each query over the real items at or before it (itself
    where there are none)."""
    batch, length, dim = query.shape
    head_dim = dim // heads
    attended = torch.zeros_like(query)
    for b in range(batch):
        for i in range(length):
            keys = [j for j in range(i + 1) if is_item[b, j]] or [i]
            for h in range(heads):
                part = slice(h * head_dim, (h + 1) * head_dim)
                logits = key[b, keys, part] @ query[b, i, part] / math.sqrt(head_dim)
                attended[b, i, part] = torch.softmax(logits, 0) @ value[b, keys, part]
    return attended


def reference_sasrec_block(block: SelfAttentionBlock, x: torch.Tensor, is_item: torch.Tensor) -> torch.Tensor:
    """SASRec's block written out: queries from LN1(x), keys and values from x, residual on the normalised input,
    LN2, a ReLU feed-forward with a residual, padding zeroed."""
    normed = layer_norm(x, block.attention_norm)
    query = normed @ block.query.weight.T + block.query.bias
    key, value = x @ block.key.weight.T + block.key.bias, x @ block.value.weight.T + block.value.bias
    hidden = layer_norm(normed + attend(query, key, value, is_item, block.num_heads), block.feed_forward_norm)
    first, second = block.feed_forward[0], block.feed_forward[3]
    fed = torch.relu(hidden @ first.weight.T + first.bias) @ second.weight.T + second.bias
    return (hidden + fed) * is_item.unsqueeze(-1)


def reference_ligr_block(block: LiGRBlock, x: torch.Tensor, is_item: torch.Tensor) -> torch.Tensor:
    """LiGR written out: h = x + sigmoid(G1 x + c1) * O(Attn(LN1 x)); out = h + sigmoid(G2 h + c2) *
    W2(silu(W LN2 h) * V LN2 h); padding zeroed."""
    dim = x.shape[-1]
    normed = layer_norm(x, block.attention_norm)
    query, key, value = (normed @ block.query_key_value.weight.T + block.query_key_value.bias).split(dim, -1)
    attended = attend(query, key, value, is_item, block.num_heads)
    projected = attended @ block.attention_output.weight.T + block.attention_output.bias
    hidden = x + torch.sigmoid(x @ block.attention_gate.weight.T + block.attention_gate.bias) * projected
    feed_forward_input = layer_norm(hidden, block.feed_forward_norm)
    w, v = block.feed_forward.gate_and_value.weight.split(block.feed_forward.output.in_features, 0)
    swiglu = (F.silu(feed_forward_input @ w.T) * (feed_forward_input @ v.T)) @ block.feed_forward.output.weight.T
    gate = torch.sigmoid(hidden @ block.feed_forward_gate.weight.T + block.feed_forward_gate.bias)
    return (hidden + gate * swiglu) * is_item.unsqueeze(-1)


def brute_force_top(model: GSASRec, input: torch.Tensor, rated: list[set[int]], limit: int
                    ) -> list[list[tuple[int, float]]]:
    """Top-`limit` (item, score) of each row of input by one full forward and a Python sort over the catalogue,
    leaving out each row's rated items."""
    with torch.no_grad():
        hidden, table = model(input)[:, -1], model.output_item_embeddings
        result = []
        for row in range(len(input)):
            scores = {item: float(hidden[row] @ table[item])
                      for item in range(1, model.num_items + 1) if item not in rated[row]}
            result.append(sorted(scores.items(), key=lambda pair: -pair[1])[:limit])
    return result
