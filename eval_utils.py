"""Full-catalogue ranking on the model's device, and metrics with ir_measures."""
import ir_measures
import numpy as np
import pandas as pd
import torch

from config import GSASRecError
from dataset_utils import Sequences, length_groups
from gsasrec import GSASRec


# On a CPU, activations of about this many positions fit the caches, which makes a forward pass markedly faster.
CPU_TOKENS_PER_BATCH = 3200
# Scores of the full catalogue held at once (256 MB in float32): ML-1M scores 512 users a batch, a catalogue of a
# million items 67, so memory stays bounded whatever the catalogue.
CATALOGUE_SCORES_PER_BATCH = 2 ** 26


@torch.inference_mode()
def recommend_batched(model: GSASRec, inputs: Sequences, limit: int, filter_rated: bool = True,
                      batch_size: int = 512, log_softmax: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-`limit` (items, scores) for every sequence: (n, limit) arrays in input order; with log_softmax the scores
    are log-probabilities of a softmax over each sequence's candidates (the catalogue less what is filtered), what a
    softmax-trained model predicts.

    Sequences are batched by length and each batch is cut to its longest input, so no work is spent on
    columns of pure padding; with filter_rated every item of the whole input history is excluded. The first block's
    keys and values come from tables made once per call (GSASRec.first_block_tables). The catalogue is scored
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
    first_block_tables = model.first_block_tables() if model.num_items + 2 < window_lengths.sum() else None
    for rows in length_groups(window_lengths, max_rows=batch_size,
                              max_positions=CPU_TOKENS_PER_BATCH if on_cpu else None):
        window = inputs.windows(rows, max(int(window_lengths[rows].max()), 1), model.padding_id)
        hidden = model(torch.from_numpy(window).to(device), last_position_only=True,
                       first_block_tables=first_block_tables)
        last_hidden[torch.from_numpy(rows).to(device)] = hidden[:, -1]
    items = np.empty((len(inputs), limit), dtype=np.int64)
    scores = np.empty((len(inputs), limit), dtype=np.float32)
    users_per_scoring = max(1, min(batch_size, CATALOGUE_SCORES_PER_BATCH // (model.num_items + 2)))
    screening_table = model.screening_table()
    for rows in length_groups(lengths, max_rows=users_per_scoring):
        longest = max(int(lengths[rows].max()), 1)
        rated = torch.from_numpy(inputs.windows(rows, longest, model.padding_id)).to(device) if filter_rated else None
        hidden = last_hidden[torch.from_numpy(rows).to(device)]
        top_items, top_scores = model.top_items(hidden, limit, rated, screening_table)
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
