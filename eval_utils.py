"""Full-catalogue ranking on the model's device, and metrics with ir_measures.

Ranking runs the network's evaluation shortcuts (last_hidden_states, screened_top_items): the same outputs as
GSASRec.forward and GSASRec.top_items, which the tests hold them equal to, with less work.
"""
import functools
from typing import NamedTuple

import ir_measures
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from config import GSASRecError
from dataset_utils import Sequences, length_groups
from gsasrec import GSASRec, SelfAttentionBlock

# Tuning constants; the figures that chose them are in docs/performance.md.
# On a CPU, activations of about this many positions fit the caches, which makes a forward pass markedly faster.
CPU_TOKENS_PER_BATCH = 3200
# Scores of the full catalogue held at once (256 MB in float32), so memory stays bounded whatever the catalogue.
CATALOGUE_SCORES_PER_BATCH = 2 ** 26
# Queries per call of the fused attention kernel in CPU evaluation (chunked_causal_attention).
CPU_QUERY_CHUNK = 64
# Catalogues of at least this many items are ranked in two passes on CPUs with native bf16 (screened_top_items).
BF16_SCREEN_MIN_ITEMS = 100_000
# Items per sequence that the bf16 pass hands to float32.
SCREEN_CANDIDATES = 256


@functools.cache
def has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively: CUDA GPUs that support bf16, CPUs with AVX512-BF16 or AMX.

    Elsewhere (AVX2-only CPUs, most laptops) PyTorch emulates bf16, many times slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


class FirstBlockTables(NamedTuple):
    """Evaluation's lookups for a first SASRec block: per item and per position, the input embedding and that
    block's key and value terms side by side, (..., 3E)."""
    items: torch.Tensor
    positions: torch.Tensor


@torch.no_grad()
def first_block_tables(model: GSASRec) -> FirstBlockTables | None:
    """Without dropout a first SASRec block's keys are W_k (e_item + e_position) + b_k = (W_k e_item) +
    (W_k e_position + b_k), and so are its values: with these tables, two of its five matrix products per
    position become part of the embedding lookup. None where there is nothing to save (LiGR blocks, or a single
    block, whose keys the last position folds away). The tables hold for the current weights."""
    if not uses_sasrec_blocks(model) or len(model.blocks) == 1:
        return None
    block = model.blocks[0]
    weight, bias = torch.cat([block.key.weight, block.value.weight]), torch.cat([block.key.bias, block.value.bias])
    items, positions = model.item_embedding.weight, model.position_embedding.weight
    return FirstBlockTables(torch.cat([items, F.linear(items, weight)], dim=1),
                            torch.cat([positions, F.linear(positions, weight, bias)], dim=1))


def uses_sasrec_blocks(model: GSASRec) -> bool:
    return all(isinstance(block, SelfAttentionBlock) for block in model.blocks)


def chunked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_bias: torch.Tensor | None) -> torch.Tensor:
    """Causal attention; on a CPU in chunks of CPU_QUERY_CHUNK queries, each over the keys up to its end. PyTorch's
    CPU kernel reads every key of a call whatever the mask, so chunks skip most of what a causal mask hides."""
    length = query.shape[2]
    if query.device.type != "cpu" or length <= CPU_QUERY_CHUNK:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_bias,
                                              is_causal=attention_bias is None)
    if attention_bias is None:
        attention_bias = torch.full((length, length), float("-inf"), dtype=query.dtype, device=query.device).triu_(1)
    return torch.cat([F.scaled_dot_product_attention(query[:, :, start:start + CPU_QUERY_CHUNK],
                                                     key[:, :, :start + CPU_QUERY_CHUNK],
                                                     value[:, :, :start + CPU_QUERY_CHUNK],
                                                     attn_mask=attention_bias[..., start:start + CPU_QUERY_CHUNK,
                                                                              :start + CPU_QUERY_CHUNK])
                      for start in range(0, length, CPU_QUERY_CHUNK)], dim=2)


def sasrec_block_all_positions(block: SelfAttentionBlock, seq: torch.Tensor, attention_bias: torch.Tensor | None,
                               is_item: torch.Tensor, key_value: torch.Tensor | None) -> torch.Tensor:
    """SelfAttentionBlock.forward in evaluation: attention in query chunks, and this block's keys and values
    (batch, L, 2E) taken from the caller where it has them (first_block_tables)."""
    normed = block.attention_norm(seq)
    key, value = key_value.chunk(2, dim=-1) if key_value is not None else (block.key(seq), block.value(seq))
    attended = chunked_causal_attention(block.split_heads(block.query(normed)), block.split_heads(key),
                                        block.split_heads(value), attention_bias)
    return block.feed_forward_output(normed + block.merge_heads(attended)) * is_item


def sasrec_block_last_position(block: SelfAttentionBlock, seq: torch.Tensor, attention_bias: torch.Tensor | None,
                               is_item: torch.Tensor) -> torch.Tensor:
    """SelfAttentionBlock.forward's last position without projecting every position's key and value (2 of 7
    per-position products): per head q . (W_k x + b_k) = (W_k^T q) . x + q . b_k, whose last term is the same for
    every key and cancels in the softmax, and sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v."""
    normed = block.attention_norm(seq[:, -1:])
    heads, head_dim = block.num_heads, seq.shape[-1] // block.num_heads
    query = block.query(normed).view(len(seq), 1, heads, head_dim).transpose(1, 2)
    folded_query = query @ block.key.weight.view(heads, head_dim, -1)
    positions = seq.unsqueeze(1).expand(-1, heads, -1, -1)
    last_bias = None if attention_bias is None else attention_bias[:, :, -1:]
    context = F.scaled_dot_product_attention(folded_query, positions, positions, last_bias, scale=head_dim ** -0.5)
    attended = block.merge_heads(context @ block.value.weight.view(heads, head_dim, -1).transpose(1, 2))
    return block.feed_forward_output(normed + attended + block.value.bias) * is_item[:, -1:]


@torch.no_grad()
def last_hidden_states(model: GSASRec, input: torch.Tensor, tables: FirstBlockTables | None = None
                       ) -> torch.Tensor:
    """model(input, last_position_only=True)[:, -1] for a model in eval mode, (batch, E): for SASRec blocks with
    the first block's keys and values looked up (tables), attention in query chunks and the last block folded;
    LiGR blocks take the plain forward."""
    if not uses_sasrec_blocks(model):
        return model(input, last_position_only=True)[:, -1]
    positions = torch.arange(model.sequence_length - input.shape[1], model.sequence_length, device=input.device)
    is_item = (input != model.padding_id).unsqueeze(-1)
    key_value = None
    if tables is not None:
        # At padding the keys and values differ from the layers' outputs; no real position attends there.
        looked_up = F.embedding(input, tables.items).add_(tables.positions[positions])
        seq, key_value = looked_up.split([model.embedding_dim, 2 * model.embedding_dim], dim=-1)
    else:
        seq = model.item_embedding(input) + model.position_embedding(positions)
    seq = seq * is_item
    attention_bias = model.attention_bias(is_item)
    for index, block in enumerate(model.blocks[:-1]):
        seq = sasrec_block_all_positions(block, seq, attention_bias, is_item, key_value if index == 0 else None)
    return model.final_norm(sasrec_block_last_position(model.blocks[-1], seq, attention_bias, is_item))[:, -1]


class ScreeningTable(NamedTuple):
    """The output table in bf16 and the largest norm of its float32 rows, made once for many batches."""
    table: torch.Tensor
    largest_norm: torch.Tensor


def screening_table(model: GSASRec) -> ScreeningTable | None:
    """What screened_top_items needs where ranking takes two passes (BF16_SCREEN_MIN_ITEMS items or more, a CPU
    with native bf16, whose products add in float32), else None."""
    table = model.output_item_embeddings.detach()
    if model.num_items >= BF16_SCREEN_MIN_ITEMS and table.device.type == "cpu" and has_native_bf16(table.device):
        return ScreeningTable(table.bfloat16(), table.norm(dim=1).max())
    return None


@torch.no_grad()
def screened_top_items(model: GSASRec, last_hidden: torch.Tensor, limit: int, rated: torch.Tensor | None,
                       screening: ScreeningTable) -> tuple[torch.Tensor, torch.Tensor]:
    """GSASRec.top_items in two passes: the catalogue in bf16, then in float32 only the bf16 pass's best
    SCREEN_CANDIDATES items. A bf16 score of h.w is within 2^-7 |h| max|w| of the float32 one (inputs and
    result rounded to 8 significant bits), so every item of the true top `limit` scores in bf16 at least the
    bf16 limit-th best minus twice that; rows whose candidates do not reach that far down are ranked whole
    in float32. The items are those of float32 ranking, up to its rounding."""
    table = model.output_item_embeddings
    screened = model.without_non_candidates(last_hidden.bfloat16() @ screening.table.T, rated)
    screened_scores, candidates = screened.topk(min(max(SCREEN_CANDIDATES, limit + 1), screened.shape[1]), dim=1)
    margin = 2 ** -6 * last_hidden.norm(dim=1) * screening.largest_norm
    screened_scores = screened_scores.float()
    covered = screened_scores[:, -1] < screened_scores[:, limit - 1] - margin
    exact = torch.bmm(table[candidates], last_hidden.unsqueeze(-1)).squeeze(-1)
    top_scores, order = exact.masked_fill(screened_scores == float("-inf"), float("-inf")).topk(limit, dim=1)
    top_items = candidates.gather(1, order)
    uncovered = (~covered).nonzero().squeeze(1)
    if len(uncovered):
        top_items[uncovered], top_scores[uncovered] = model.top_items(
            last_hidden[uncovered], limit, None if rated is None else rated[uncovered])
    return top_items, top_scores


@torch.inference_mode()
def recommend_batched(model: GSASRec, inputs: Sequences, limit: int, filter_rated: bool = True,
                      batch_size: int = 512, log_softmax: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-`limit` (items, scores) for every sequence: (n, limit) arrays in input order; with log_softmax the scores
    are log-probabilities of a softmax over each sequence's candidates (the catalogue less what is filtered), what a
    softmax-trained model predicts.

    Sequences are batched by length and each batch is cut to its longest input, so no work is spent on
    columns of pure padding; with filter_rated every item of the whole input history is excluded. The first block's
    keys and values come from tables made once per call (first_block_tables). The catalogue is scored
    afterwards in batches of at most batch_size users and CATALOGUE_SCORES_PER_BATCH scores."""
    device = next(model.parameters()).device
    limit = min(limit, model.num_items)  # lists longer than a small catalogue would rank non-items
    was_training = model.training
    model.eval()
    lengths = inputs.lengths
    last_hidden = torch.empty(len(inputs), model.embedding_dim, device=device)
    on_cpu = device.type == "cpu"
    window_lengths = np.minimum(lengths, model.sequence_length)
    # The tables cost a product per catalogue row and save one per position: worth it for catalogues smaller than
    # the positions to run (ML-1M: 3,418 rows against 656,377 test positions).
    tables = first_block_tables(model) if model.num_items + 2 < window_lengths.sum() else None
    for rows in length_groups(window_lengths, max_rows=batch_size,
                              max_positions=CPU_TOKENS_PER_BATCH if on_cpu else None):
        window = inputs.windows(rows, max(int(window_lengths[rows].max()), 1), model.padding_id)
        last_hidden[torch.from_numpy(rows).to(device)] = last_hidden_states(model, torch.from_numpy(window).to(device),
                                                                             tables)
    items = np.empty((len(inputs), limit), dtype=np.int64)
    scores = np.empty((len(inputs), limit), dtype=np.float32)
    users_per_scoring = max(1, min(batch_size, CATALOGUE_SCORES_PER_BATCH // (model.num_items + 2)))
    screening = screening_table(model)
    for rows in length_groups(lengths, max_rows=users_per_scoring):
        longest = max(int(lengths[rows].max()), 1)
        rated = torch.from_numpy(inputs.windows(rows, longest, model.padding_id)).to(device) if filter_rated else None
        hidden = last_hidden[torch.from_numpy(rows).to(device)]
        top_items, top_scores = (model.top_items(hidden, limit, rated) if screening is None else
                                 screened_top_items(model, hidden, limit, rated, screening))
        if log_softmax:
            candidates = model.without_non_candidates(hidden @ model.output_item_embeddings.T, rated)
            top_scores = top_scores.float() - candidates.logsumexp(1, keepdim=True)
        items[rows] = top_items.cpu().numpy()
        scores[rows] = top_scores.float().cpu().numpy()
    model.train(was_training)
    return items, scores


def ranking_metrics(recommended: np.ndarray, targets: np.ndarray, metrics: list[str]) -> dict[str, float]:
    """Metrics of ranked lists (n, limit) against one relevant item per user.

    nDCG@k and R@k are computed directly from the rank of the relevant item (a test checks them against
    ir_measures, 0.2 s faster on ML-1M); any other measure goes through ir_measures."""
    hits = recommended == targets[:, None]
    rank = np.where(hits.any(1), hits.argmax(1), recommended.shape[1])
    direct = {"nDCG": lambda k: np.where(rank < k, 1 / np.log2(rank + 2), 0.0), "R": lambda k: rank < k}
    values = {}
    for name in metrics:
        measure, _, cutoff = name.partition("@")
        if measure in direct and cutoff.isdigit() and int(cutoff) <= recommended.shape[1]:
            values[name] = float(direct[measure](int(cutoff)).mean())
    others = [name for name in metrics if name not in values]
    if others:
        values.update(ir_measures_metrics(recommended, targets, others))
    return {name: values[name] for name in metrics}


def ir_measures_metrics(recommended: np.ndarray, targets: np.ndarray, metrics: list[str]) -> dict[str, float]:
    """Any ir_measures measure of ranked lists (n, limit) against one relevant item per user."""
    count, limit = recommended.shape
    query_ids = np.arange(count).astype(str)
    qrels = pd.DataFrame({"query_id": query_ids, "doc_id": targets.astype(str), "relevance": 1})
    run = pd.DataFrame({"query_id": np.repeat(query_ids, limit), "doc_id": recommended.ravel().astype(str),
                        "score": np.tile(np.arange(limit, 0, -1, dtype=np.float64), count)})
    return aggregate_ir_measures(metrics, qrels, run)


def aggregate_ir_measures(metrics: list[str], qrels, run) -> dict[str, float]:
    """ir_measures' mean of each named measure over the queries of a run (DataFrames or nested dicts)."""
    values = ir_measures.calc_aggregate([ir_measures.parse_measure(name) for name in metrics], qrels, run)
    return {name: float(values.get(ir_measures.parse_measure(name), 0.0)) for name in metrics}


def metric_problems(metrics: list, limit: int) -> list[str]:
    """What is wrong with metric names for lists of `limit` items: names ir_measures does not know, and cutoffs
    past the lists (R@50 over 10 items would silently score R@10)."""
    problems = []
    for name in metrics:
        try:
            cutoff = ir_measures.parse_measure(name).params.get("cutoff")
        except (NameError, ValueError, SyntaxError, TypeError, AttributeError):
            problems.append(f"metric {name!r} is not an ir_measures measure (e.g. nDCG@10, R@10, RR@10)")
            continue
        if cutoff is not None and cutoff > limit:
            problems.append(f"metric {name} needs lists of {cutoff} items: raise recommendation_limit ({limit}) "
                            f"to at least {cutoff}")
    return problems


def evaluate(model: GSASRec, inputs: Sequences, targets: np.ndarray, metrics: list[str], limit: int,
             filter_rated: bool = True, batch_size: int = 512) -> dict[str, float]:
    """Full-catalogue top-`limit` lists for the inputs, scored against one target item each."""
    problems = metric_problems(metrics, limit)
    if problems:
        raise GSASRecError("; ".join(problems))
    recommended, _ = recommend_batched(model, inputs, limit, filter_rated, batch_size)
    return ranking_metrics(recommended, targets, metrics)


def calibration_report(top_probabilities: np.ndarray, top_is_hit: np.ndarray, num_bins: int = 10) -> dict:
    """How well the predicted probability of the top-1 item predicts that it is the held-out one.

    Users are sorted by predicted probability and cut into num_bins equal-mass bins; the expected calibration
    error is the count-weighted mean |predicted - observed| over bins, and the overconfidence factor is the mean
    predicted top-1 probability divided by the observed R@1."""
    order = np.argsort(top_probabilities, kind="stable")
    bins = [bin_rows for bin_rows in np.array_split(order, num_bins) if len(bin_rows)]
    predicted = np.array([top_probabilities[rows].mean() for rows in bins])
    observed = np.array([top_is_hit[rows].mean() for rows in bins])
    counts = np.array([len(rows) for rows in bins])
    mean_probability, recall_at_1 = float(top_probabilities.mean()), float(top_is_hit.mean())
    return {
        "mean_top1_probability": mean_probability,
        "R@1": recall_at_1,
        "overconfidence": mean_probability / recall_at_1 if recall_at_1 > 0 else float("inf"),
        "ece": float((counts * np.abs(predicted - observed)).sum() / counts.sum()),
        "bins": [{"predicted": float(p), "observed": float(o), "count": int(c)}
                 for p, o, c in zip(predicted, observed, counts)],
    }


def top1_calibration(recommended: np.ndarray, scores: np.ndarray, targets: np.ndarray, num_bins: int = 10,
                     log_probabilities: bool = False) -> dict:
    """calibration_report of the top-1 item's probability against whether it is the target: sigmoid(score) for
    gBCE's logits, exp(score) for a softmax's log-probabilities (recommend_batched's log_softmax)."""
    top = scores[:, 0].astype(np.float64)
    probabilities = np.exp(top) if log_probabilities else 1 / (1 + np.exp(-top))
    return calibration_report(probabilities, recommended[:, 0] == targets, num_bins)


def plot_reliability_diagrams(reports: dict[str, dict], path: str) -> None:
    """Reliability diagrams side by side (one per named calibration report), saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(reports), figsize=(4.2 * len(reports), 4.4), squeeze=False)
    for axis, (name, report) in zip(axes[0], reports.items()):
        predicted = [b["predicted"] for b in report["bins"]]
        observed = [b["observed"] for b in report["bins"]]
        limit = max(max(predicted), max(observed), 0.05) * 1.1
        axis.plot([0, limit], [0, limit], "--", color="grey", label="perfect calibration")
        axis.plot(predicted, observed, "o-", label="model")
        for b in report["bins"]:
            axis.annotate(str(b["count"]), (b["predicted"], b["observed"]), textcoords="offset points",
                          xytext=(3, 4), fontsize=7, color="dimgrey")
        axis.set(xlim=(0, limit), ylim=(0, limit), xlabel="predicted P(top-1 is the next item)",
                 ylabel="observed frequency", title=f"{name}\nECE {report['ece']:.3f}, "
                                                   f"overconfidence {report['overconfidence']:.2f}x")
        axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")  # whatever the name ends in: a script writes a temporary first
    plt.close(figure)
