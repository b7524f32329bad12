"""Trains gSASRec: gBCE with sampled negatives (or a softmax: config.loss), validation nDCG@10 after every epoch,
early stopping.

Resumable: the run folder holds the latest training state (written atomically after every epoch, on
Ctrl-C / SIGTERM and when a budget runs out), the best checkpoint and a JSONL log. Rerunning the same
command continues where it stopped, with the same numbers an uninterrupted run gives.
"""
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.adam import adam
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from config import GSASRecError, GSASRecExperimentConfig
from dataset_utils import DatasetSplit, ensure_dataset, length_groups, load_dataset
from eval_utils import evaluate
from gsasrec import (GSASRec, gbce_beta, gbce_loss, has_native_bf16, logq_shift, sampled_softmax_loss,
                     softmax_loss)
from utils import (CommandLineParser, apply_overrides, atomic_save, atomic_write, build_model, check_tensors,
                   checkpoint_name, cpu_weights, load_config, load_tensors_file, machine_description, model_checkpoint,
                   read_checkpoint, resolve_device, run_cli, writable_folder)

# Transparent huge pages for PyTorch's large CPU tensors (read at its first large allocation): measured when a
# million-item step still allocated 1 GB of table gradients, they took it from 2.31 to 2.09-2.12 s (median of 4).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
STATE_FILE = "train_state.pt"
STATE_KEYS = ("config", "model_state", "optimizer_state", "scheduler_state", "progress", "rng_states")
LOG_FILE = "log.jsonl"
# Fields a resumed run may change: they bound the run but do not change what one step computes.
BUDGET_FIELDS = {"max_epochs", "max_steps", "max_training_time", "early_stopping_patience"}


# On a CPU, sequences go through the model in groups of similar length (dataset_utils.length_groups), each cut to
# its own longest sequence; a group takes the next longer sequence while its padding stays within this many
# positions. Every group also costs fixed work: on ML-1M, 256 was 4% faster than groups of 16 rows and than
# budgets of 64 or 128.
CPU_GROUP_PADDING = 256
# Per-position negatives up to this fraction of the catalogue are gathered rather than scored over the catalogue.
SMALL_K_FRACTION = 0.01


# Rows of targets per block when scoring the catalogue for per-position negatives: a block's (rows, num_items)
# scores stay in cache, and every product has the same shape (oneDNN's bf16 kernels are rebuilt for every new
# shape, 2-4 ms each). On ML-1M, blocks took 0.15 s for the forward and backward against 0.24 s in one product.
CATALOGUE_BLOCK_ROWS = 256


class SampledCatalogueScores(torch.autograd.Function):
    """Scores of each target's own negatives, (n, k), through the catalogue product hidden @ table.T computed in
    fixed-size blocks of rows and never kept. The backward rebuilds each block's gradient from the (n, k) one for
    the table's gradient, and takes the hidden gradient as GatheredScores does, with an embedding_bag: exact in
    float32, and on ML-1M as fast as a second product on two threads, 15% faster on one. With dtype bf16 the
    products run in bf16; scores are float32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, table: torch.Tensor, negatives: torch.Tensor, dtype: torch.dtype,
                sparse: bool) -> torch.Tensor:
        ctx.sparse = sparse
        padding = -len(hidden) % CATALOGUE_BLOCK_ROWS
        hidden_blocks = F.pad(hidden.to(dtype), (0, 0, 0, padding)).view(-1, CATALOGUE_BLOCK_ROWS, hidden.shape[1])
        negative_blocks = F.pad(negatives, (0, 0, 0, padding)).view(len(hidden_blocks), CATALOGUE_BLOCK_ROWS, -1)
        ctx.save_for_backward(hidden_blocks, table, negative_blocks)
        table_t = table.to(dtype).T
        scores = torch.stack([(block @ table_t).gather(1, block_negatives).float()
                              for block, block_negatives in zip(hidden_blocks, negative_blocks)])
        return scores.flatten(0, 1)[:len(hidden)]

    @staticmethod
    def backward(ctx, grad_scores: torch.Tensor):
        hidden_blocks, table, negative_blocks = ctx.saved_tensors
        count = grad_scores.shape[0]
        grad_blocks = F.pad(grad_scores, (0, 0, 0, len(hidden_blocks) * CATALOGUE_BLOCK_ROWS - count))
        grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
        for block, block_negatives, block_grad in zip(hidden_blocks, negative_blocks,
                                                      grad_blocks.view(*negative_blocks.shape)):
            grad_block_scores = torch.zeros(CATALOGUE_BLOCK_ROWS, len(table), dtype=torch.float32,
                                            device=table.device).scatter_add_(1, block_negatives, block_grad)
            grad_table += grad_block_scores.to(hidden_blocks.dtype).T @ block
        grad_table = grad_table.to(table.dtype)
        grad_hidden = F.embedding_bag(negative_blocks.flatten(0, 1)[:count], table, per_sample_weights=grad_scores,
                                      mode="sum")
        return grad_hidden, grad_table.to_sparse(1) if ctx.sparse else grad_table, None, None, None


class CatalogueLogSumExp(torch.autograd.Function):
    """log sum_j exp(h . w_j) over the catalogue's items (ids 1..num_items) for each row of hidden, (n,): the full
    softmax's normaliser, through the product hidden @ table.T in fixed-size blocks of rows, never kept whole.
    The backward rebuilds each block's softmax p and takes g * p @ table for the hidden rows and (g * p).T @ hidden
    for the table. With dtype bf16 the products run in bf16; softmax and normalisers are float32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, table: torch.Tensor, dtype: torch.dtype, sparse: bool) -> torch.Tensor:
        ctx.sparse, ctx.dtype = sparse, dtype
        padding = -len(hidden) % CATALOGUE_BLOCK_ROWS
        hidden_blocks = F.pad(hidden.to(dtype), (0, 0, 0, padding)).view(-1, CATALOGUE_BLOCK_ROWS, hidden.shape[1])
        items_t = table[1:-1].to(dtype).T
        normalisers = torch.stack([(block @ items_t).float().logsumexp(1) for block in hidden_blocks])
        ctx.save_for_backward(hidden_blocks, table, normalisers)
        return normalisers.flatten()[:len(hidden)]

    @staticmethod
    def backward(ctx, grad_normalisers: torch.Tensor):
        hidden_blocks, table, normalisers = ctx.saved_tensors
        count = grad_normalisers.shape[0]
        grad_blocks = F.pad(grad_normalisers, (0, len(hidden_blocks) * CATALOGUE_BLOCK_ROWS - count)).view(
            normalisers.shape)
        items = table[1:-1].to(ctx.dtype)
        grad_items = torch.zeros(items.shape, dtype=torch.float32, device=table.device)
        grad_hidden = []
        for block, block_normalisers, block_grad in zip(hidden_blocks, normalisers, grad_blocks):
            weights = ((block @ items.T).float() - block_normalisers[:, None]).exp_().mul_(block_grad[:, None])
            weights = weights.to(ctx.dtype)
            grad_hidden.append((weights @ items).float())
            grad_items += (weights.T @ block).float()
        grad_table = F.pad(grad_items, (0, 0, 1, 1)).to(table.dtype)
        grad_hidden = torch.cat(grad_hidden)[:count].to(table.dtype)
        return grad_hidden, grad_table.to_sparse(1) if ctx.sparse else grad_table, None, None


# Target rows per chunk when gathering each target's own negatives: a chunk's (rows, k, E) embeddings hold at most
# this many numbers (4 MB), which stay in cache for their product with the hidden rows. On a million items, with
# the product as multiply and sum, the gathered forward took 0.31-0.34 s a step against 0.56-0.77 s for 16 MB
# chunks and bmm.
GATHERED_NUMBERS_PER_CHUNK = 2 ** 20


class ItemBags:
    """A table's gradient whose row i sums weight * source row over the pairs that drew item i: with the pairs
    ordered by item, each row is one bag of source rows, so any block of rows is one embedding_bag. Pair p's source
    row is p // pairs_per_source; weights None for all ones. On a million items, bags took the gathered backward
    from 0.56 s (and the zeroing of a 512 MB table) to 0.26 s against adding each chunk's (rows, k, E) into a table."""

    def __init__(self, items: torch.Tensor, pairs_per_source: int, source_rows: torch.Tensor,
                 weights: torch.Tensor | None, num_rows: int):
        # int32 keys: sorted in about half the time of int64's (3.6 million pairs: 0.05 against 0.09 s)
        items, order = items.flatten().to(torch.int32).sort(stable=True)
        self.counts = torch.bincount(items, minlength=num_rows)
        self.bounds = F.pad(self.counts.cumsum(0), (1, 0))  # row i's pairs: bounds[i] to bounds[i + 1]
        self.weights = None if weights is None else weights.flatten()[order]
        self.sources = order.div_(pairs_per_source, rounding_mode="floor")  # in place: one 30 MB array fewer
        self.source_rows = source_rows

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Rows start..end - 1 of the gradient, dense."""
        first, last = int(self.bounds[start]), int(self.bounds[end])
        return F.embedding_bag(self.sources[first:last], self.source_rows, self.bounds[start:end] - first,
                               per_sample_weights=None if self.weights is None else self.weights[first:last],
                               mode="sum")

    def sparse(self, shape: torch.Size) -> torch.Tensor:
        """The gradient as a sparse tensor of the rows drawn."""
        drawn = self.counts.nonzero().squeeze(1)
        values = F.embedding_bag(self.sources, self.source_rows, self.bounds[drawn],
                                 per_sample_weights=self.weights, mode="sum")
        return torch.sparse_coo_tensor(drawn.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False)


# Rows of a table per block of its Adam step in backward (TableStep): its gradient, parameters and moments stay in
# cache between the bags that make the gradient and the update.
TABLE_STEP_BLOCK_ROWS = 8192


class TableStep:
    """Adam's step of one item table, taken inside backward from its gradient's bags, block by block of rows, so the
    gradient never exists whole (on a million items it is 512 MB). The state and settings are the table's own
    Adam's, whose step() then skips the table: it has no gradient."""

    def __init__(self, optimizer: torch.optim.Adam, table: nn.Parameter):
        self.optimizer, self.table = optimizer, table

    def __call__(self, gradient: ItemBags) -> None:
        group, state = self.optimizer.param_groups[0], self.optimizer.state[self.table]
        table = self.table.detach()
        if not state:  # as torch.optim.Adam starts a parameter's state
            state.update(step=torch.zeros((), dtype=torch.float32, device=table.device),
                         exp_avg=torch.zeros_like(table), exp_avg_sq=torch.zeros_like(table))
        steps_before = state["step"].clone()
        state["step"] += 1
        beta1, beta2 = group["betas"]
        for start in range(0, len(table), TABLE_STEP_BLOCK_ROWS):
            block = slice(start, min(start + TABLE_STEP_BLOCK_ROWS, len(table)))
            # adam() counts the step itself, on its own copy of the count.
            adam([table[block]], [gradient.rows(block.start, block.stop)], [state["exp_avg"][block]],
                 [state["exp_avg_sq"][block]], [], [steps_before.clone()], fused=group["fused"],
                 amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])


class TableSteps(NamedTuple):
    """The tables whose Adam step training_loss's backward takes (TableStep): None for one whose gradient is made
    whole, as for any parameter."""
    input: TableStep | None = None
    output: TableStep | None = None


class ItemLookup(torch.autograd.Function):
    """The input table's rows of ids, (..., E), as F.embedding, whose backward hands the table's gradient to a
    TableStep as bags rather than returning it."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, ids: torch.Tensor, table_step: TableStep) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.table_step, ctx.num_rows = table_step, len(table)
        return F.embedding(ids, table)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        ids, = ctx.saved_tensors
        ctx.table_step(ItemBags(ids, 1, grad_rows.reshape(-1, grad_rows.shape[-1]), None, ctx.num_rows))
        return None, None, None


class GatheredScores(torch.autograd.Function):
    """Scores of each target's own k negatives, (n, k): hidden rows dotted with their gathered table rows, in
    chunks of rows so the (n, k, E) embeddings never exist at once. The backward needs no (n, k, E) either: the
    hidden gradient is an embedding_bag of the table weighted by the score gradient, and the table gradient bags
    of the hidden rows (ItemBags): dense, sparse (the rows drawn), or taken by a TableStep."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, table: torch.Tensor, negatives: torch.Tensor, sparse: bool,
                table_step: TableStep | None) -> torch.Tensor:
        ctx.save_for_backward(hidden, table, negatives)
        ctx.sparse, ctx.table_step = sparse, table_step
        chunk = max(1, GATHERED_NUMBERS_PER_CHUNK // (negatives.shape[1] * hidden.shape[1]))
        # Rows gathered as bags of one: 5x faster than F.embedding's index_select on a table of a million rows,
        # as fast on ML-1M's.
        gathered = (F.embedding_bag(chunk_negatives.reshape(-1, 1), table, mode="sum").view(*chunk_negatives.shape, -1)
                    for chunk_negatives in negatives.split(chunk))
        return torch.cat([(rows * chunk_hidden.unsqueeze(1)).sum(-1)
                          for rows, chunk_hidden in zip(gathered, hidden.split(chunk))])

    @staticmethod
    def backward(ctx, grad_scores: torch.Tensor):
        hidden, table, negatives = ctx.saved_tensors
        grad_hidden = F.embedding_bag(negatives, table, per_sample_weights=grad_scores, mode="sum")
        gradient = ItemBags(negatives, negatives.shape[1], hidden, grad_scores, len(table))
        grad_table = None
        if ctx.table_step is not None:
            ctx.table_step(gradient)
        else:
            grad_table = gradient.sparse(table.shape) if ctx.sparse else gradient.rows(0, len(table))
        return grad_hidden, grad_table, None, None, None


class GroupScores(NamedTuple):
    """One length group's targets (non-padded positions), in row-major order."""
    hidden: torch.Tensor  # (n, E) last hidden states
    labels: torch.Tensor  # (n,) the items to predict
    negative: torch.Tensor | None  # (n, k) scores of per-sequence negatives; None for per-position ones


def score_group(model: GSASRec, rows: torch.Tensor, item_vectors: torch.Tensor, negatives: torch.Tensor | None,
                config: GSASRecExperimentConfig) -> GroupScores:
    """One pass of the model over rows of similar length, cut to their longest: inputs rows[:, :-1] (whose item
    vectors are item_vectors, (rows, width - 1, E)), labels rows[:, 1:]. negatives: (rows, k) ids per sequence,
    or None for per-position negatives. Rows of the output table are looked up with F.embedding, whose gradient
    on a CPU is far cheaper than indexing's."""
    width = max(int((rows != model.padding_id).sum(1).max()), 2)
    input, labels = rows[:, -width:-1], rows[:, -width + 1:]
    # Flat row numbers of the targets: index_select's gradient adds whole rows, far cheaper than a mask's.
    targets = (input != model.padding_id).flatten().nonzero().squeeze(1)
    bf16 = config.bf16 and has_native_bf16(rows.device)
    with torch.autocast(rows.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model(input, item_vectors=item_vectors[:, -width + 1:]).float()
    target_hidden, target_labels = hidden.flatten(0, 1).index_select(0, targets), labels.flatten()[targets]
    if negatives is None:
        return GroupScores(target_hidden, target_labels, None)
    embeddings = F.embedding(negatives, model.output_item_embeddings, sparse=model.item_embedding.sparse)
    negative = torch.bmm(hidden, embeddings.transpose(1, 2)).flatten(0, 1).index_select(0, targets)
    return GroupScores(target_hidden, target_labels, negative)


def training_loss(model: GSASRec, batch: torch.Tensor, config: GSASRecExperimentConfig, beta: float,
                  generator: torch.Generator, table_steps: TableSteps = TableSteps()) -> torch.Tensor:
    """The config's loss over every non-padded position of a (batch, width) window: inputs batch[:, :-1], labels
    batch[:, 1:]. table_steps: the item tables that backward steps (AdamWithSeparateTables.table_steps).

    On a CPU, rows go through score_group in groups of similar length: the same loss as one padded pass
    (sequences do not interact), with about 40% fewer positions on ML-1M. Positives and per-position negatives
    are scored after all groups, all targets at once: one gradient of the output table instead of one a group."""
    # Drawn up front, for every row or for every target in row-major order, so the draw does not depend on
    # grouping; target_numbers[row, column] is a target's row in the per-position draw.
    is_target = batch[:, :-1] != model.padding_id
    sampled = config.loss != "softmax"
    per_sequence = sampled and config.negative_sampling == "per_sequence"
    count = len(batch) if per_sequence else int(is_target.sum())
    negatives = torch.randint(1, model.num_items + 1, (count, config.negs_per_pos), generator=generator,
                              device=generator.device).to(batch.device) if sampled else None
    lengths = (batch != model.padding_id).sum(1)
    on_cpu = batch.device.type == "cpu"
    groups = ([torch.from_numpy(group) for group in length_groups(lengths.numpy(), max_padding=CPU_GROUP_PADDING)]
              if on_cpu else [torch.arange(len(batch), device=batch.device)])
    sizes = [len(group) for group in groups]
    grouped = batch[torch.cat(groups)]
    # The input vectors of every group in one lookup: one gradient of the item table, not one per group (on a
    # million items each group's is a dense 512 MB to fill and add; 12 groups were 2 s of a 4.7 s step).
    ids = grouped[:, :-1]
    item_vectors = (model.item_embedding(ids) if table_steps.input is None else
                    ItemLookup.apply(model.item_embedding.weight, ids, table_steps.input)).split(sizes)
    scores = [score_group(model, rows, rows_vectors, negatives[group] if per_sequence else None, config)
              for group, rows, rows_vectors in zip(groups, grouped.split(sizes), item_vectors)]
    hidden = torch.cat([group.hidden for group in scores])
    labels = torch.cat([group.labels for group in scores])
    table, sparse = model.output_item_embeddings, model.item_embedding.sparse
    catalogue_dtype = torch.bfloat16 if config.bf16_scores and has_native_bf16(batch.device) else torch.float32
    gathered = sampled and not per_sequence and config.negs_per_pos <= SMALL_K_FRACTION * model.num_items
    if not gathered:
        positive = (hidden * F.embedding(labels, table, sparse=sparse)).sum(-1)
    if not sampled:
        return softmax_loss(positive, CatalogueLogSumExp.apply(hidden, table, catalogue_dtype, sparse))
    if per_sequence:
        negative = torch.cat([group.negative for group in scores])
    else:
        target_numbers = is_target.flatten().cumsum(0).view(is_target.shape) - 1
        negatives = negatives[torch.cat([target_numbers[group][is_target[group]] for group in groups])]
        if gathered:
            # Few negatives for the catalogue (SASRec's k = 1, or k = 256 of 10^5 items and more): each target's own
            # rows gathered, its positive in column 0, so the table gets one gradient instead of two to add up
            # (on a million items each is 512 MB when dense).
            scored = GatheredScores.apply(hidden, table, torch.cat([labels.unsqueeze(1), negatives], 1), sparse,
                                          table_steps.output)
            positive, negative = scored[:, 0], scored[:, 1:]
        else:
            # Many for the catalogue: scoring all of it and gathering is far cheaper than (n, k, E).
            negative = SampledCatalogueScores.apply(hidden, table, negatives, catalogue_dtype, sparse)
    if config.loss == "sampled_softmax":
        shift = logq_shift(config.negs_per_pos, model.num_items) if config.logq_correction else 0.0
        return sampled_softmax_loss(positive, negative, shift)
    return gbce_loss(positive, negative, beta)


class AdamWithSeparateTables(torch.optim.Optimizer):
    """Adam with optimizers of their own for the item tables: torch.optim.SparseAdam's lazy update
    (sparse_item_updates), or else Adam per table, which with in_backward and separate tables backward steps itself
    (table_steps): neither table's gradient then exists whole. The updates are Adam's either way; one optimizer for
    the learning-rate schedule and the training state."""

    def __init__(self, dense: list[nn.Parameter], tables: list[nn.Parameter], lr: float, fused: bool, lazy: bool,
                 in_backward: bool):
        table_parts = ([torch.optim.SparseAdam(tables, lr=lr)] if lazy else
                       [torch.optim.Adam([table], lr=lr, fused=fused) for table in tables])
        self.parts = (torch.optim.Adam(dense, lr=lr, fused=fused), *table_parts)
        self.table_steps = TableSteps(*(TableStep(part, table) for part, table in zip(table_parts, tables))
                                      ) if in_backward and not lazy and len(tables) == 2 else TableSteps()
        super().__init__(self.part_groups(), {"lr": lr, "fused": fused})

    def part_groups(self) -> list[dict]:
        """The parts' own parameter groups, so a learning rate set here is the one they use."""
        return [group for part in self.parts for group in part.param_groups]

    def step(self, closure=None) -> None:
        for part in self.parts:
            part.step()

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict.get("parts", ())) != len(self.parts):
            raise GSASRecError("the training state's optimizer was saved by an earlier version of this code (one Adam "
                               "for every parameter); start the run again with --fresh")
        for part, part_state in zip(self.parts, state_dict["parts"]):
            part.load_state_dict(part_state)
        self.param_groups = self.part_groups()  # loading replaced the parts' group dicts


def build_optimizer(model: GSASRec, config: GSASRecExperimentConfig, in_backward: bool = True
                    ) -> AdamWithSeparateTables:
    """Adam at the config's learning rate, with PyTorch's fused kernel on CPUs and CUDA: one pass over each
    parameter instead of about ten (4.5 ms of a CPU step on ML-1M). The item tables are stepped in backward
    (in_backward; not under DistributedDataParallel, which averages gradients after backward), or with
    sparse_item_updates updated lazily (AdamWithSeparateTables)."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    tables = list({id(table): table for table in (model.item_embedding.weight, model.output_item_embeddings)}.values())
    dense = [parameter for parameter in model.parameters() if all(parameter is not table for table in tables)]
    return AdamWithSeparateTables(dense, tables, config.learning_rate, fused, config.sparse_item_updates, in_backward)


def training_batch(dataset: DatasetSplit, rows: np.ndarray, config: GSASRecExperimentConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """A window of up to sequence_length + 1 items of each chosen user, cut to the longest one in the batch: the
    latest items, or (training_window="random") those before an end drawn uniformly from the ends that still
    fill the window. Only the random windows draw from the generator."""
    lengths = dataset.train.lengths[rows]
    window = config.sequence_length + 1
    if config.training_window == "random":
        shortest = np.minimum(lengths, window)
        draw = torch.rand(len(rows), generator=generator, device=generator.device).cpu().numpy()
        lengths = shortest + np.floor(draw * (lengths - shortest + 1)).astype(np.int64)
    width = min(int(lengths.max()), window)
    return torch.from_numpy(dataset.train.windows(rows, width, dataset.padding_id, lengths).astype(np.int64))


def learning_rate_factor(config: GSASRecExperimentConfig, step: int) -> float:
    """The multiplier of the learning rate at a step: linear warm-up, then constant or a cosine decay to 0."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_decay_steps:
        progress = min(1.0, (step - config.warmup_steps) / config.lr_decay_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


class InteractionWeightedSampler:
    """user_sampling="per_interaction": an epoch draws as many users as there are, with replacement, each in
    proportion to (length - 1) / (min(length, window) - 1), its training targets over those one window holds; with
    random windows every interaction is then a target about equally often. Each rank takes its own share of one
    draw, which depends only on the seed and the epoch (as DistributedSampler's shuffle), so a resumed run repeats
    it."""

    def __init__(self, lengths: np.ndarray, window: int, num_replicas: int, rank: int, seed: int):
        self.weights = torch.from_numpy((lengths - 1) / (np.minimum(lengths, window) - 1))
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(lengths) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True,
                                 generator=generator)
        return iter(draw[self.rank::self.num_replicas].tolist())


class TrainingObjective(nn.Module):
    """The loss of one batch as a module, so DistributedDataParallel can wrap the whole step."""

    def __init__(self, model: GSASRec, config: GSASRecExperimentConfig, beta: float, table_steps: TableSteps):
        super().__init__()
        self.model, self.config, self.beta, self.table_steps = model, config, beta, table_steps

    def forward(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return training_loss(self.model, batch, self.config, self.beta, generator, self.table_steps)


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a flag checked between steps; a second one interrupts at once."""

    def __init__(self, announce: bool):
        self.requested = False
        self.announce = announce
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nStopping: saving the training state after this step (press Ctrl-C again to abort)...")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# Why a run stops. These two end it: rerunning says it has finished, unless the config now allows more. The others
# ("max_steps", "max_training_time", "interrupted") pause it, and rerunning the same command continues.
ENDING_REASONS = ("early stopping", "max_epochs")


@dataclass
class Progress:
    """Where a run stands: saved in the training state, updated in place by the Trainer."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_loss_sum: float = 0.0
    best_metric: float = -math.inf
    best_checkpoint: str | None = None
    epochs_without_improvement: int = 0
    elapsed_seconds: float = 0.0
    stopped: str | None = None  # None while it runs

    @property
    def finished(self) -> bool:
        return self.stopped in ENDING_REASONS

    @classmethod
    def from_dict(cls, values: dict) -> "Progress":
        known = {field.name for field in fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in known})


def comparable(config: GSASRecExperimentConfig) -> dict:
    values = config.__dict__.copy()
    for name in BUDGET_FIELDS:
        values.pop(name)
    return values


class Trainer:
    """One training run, alone or as one rank of a torchrun job.

    With world_size > 1 each rank trains on its own shard of users (DistributedSampler) with
    train_batch_size users per step, so a step sees train_batch_size * world_size users; DDP averages the
    gradients. Rank 0 validates, logs and writes checkpoints, and its decisions are broadcast so all ranks
    stop together."""

    def __init__(self, config: GSASRecExperimentConfig, dataset: DatasetSplit, run_dir: Path, device: torch.device,
                 rank: int = 0, world_size: int = 1, log_test_metrics: bool = False, progress: bool = True):
        self.config, self.dataset, self.run_dir, self.device = config, dataset, Path(run_dir), device
        self.rank, self.world_size = rank, world_size
        self.log_test_metrics, self.show_progress = log_test_metrics, progress and rank == 0
        torch.manual_seed(config.seed)
        self.model = build_model(config, dataset.num_items).to(device)
        torch.manual_seed(config.seed + rank)
        self.generator = torch.Generator(device=device).manual_seed(config.seed + rank)
        self.optimizer = build_optimizer(self.model, config, in_backward=world_size == 1)
        self.averaged = None if config.weight_averaging_decay is None else AveragedModel(
            self.model, multi_avg_fn=get_ema_multi_avg_fn(config.weight_averaging_decay))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(learning_rate_factor, config))
        objective = TrainingObjective(self.model, config, gbce_beta(config.negs_per_pos, dataset.num_items,
                                                                    config.gbce_t), self.optimizer.table_steps)
        self.objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda"
                                                 else None) if world_size > 1 else objective
        self.trainable_rows = np.flatnonzero(dataset.train.lengths >= 2)
        if not len(self.trainable_rows):
            raise GSASRecError("no training sequence has 2 or more items: there is nothing to learn from")
        if config.user_sampling == "per_interaction":
            self.sampler = InteractionWeightedSampler(dataset.train.lengths[self.trainable_rows],
                                                      config.sequence_length + 1, world_size, rank, config.seed)
        else:
            self.sampler = DistributedSampler(range(len(self.trainable_rows)), num_replicas=world_size, rank=rank,
                                              shuffle=True, seed=config.seed)
        self.batches_per_epoch = min(config.max_batches_per_epoch,
                                     math.ceil(len(self.sampler) / config.train_batch_size))
        self.progress = Progress()
        self.clock = time.perf_counter()

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    @property
    def evaluated_model(self) -> GSASRec:
        """The weights that are validated, checkpointed and shipped: the moving average when the config keeps one."""
        return self.model if self.averaged is None else self.averaged.module

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def save_state(self) -> None:
        """Collective: gathers every rank's RNG state, then rank 0 writes the state file atomically. The file is
        also a model checkpoint, so evaluate_gsasrec.py can score a run's latest weights, not only its best; with
        weight averaging those are the averaged ones, and the raw weights go alongside for resuming."""
        rng_states = [self.rng_state()]
        if self.world_size > 1:
            rng_states = [None] * self.world_size
            dist.all_gather_object(rng_states, self.rng_state())
        if self.rank == 0:
            raw_weights = {} if self.averaged is None else {"training_model_state": cpu_weights(self.model)}
            atomic_save(model_checkpoint(self.evaluated_model, self.config, optimizer_state=self.optimizer.state_dict(),
                                         scheduler_state=self.scheduler.state_dict(), rng_states=rng_states,
                                         progress=asdict(self.progress), training=self.training_record(),
                                         **raw_weights),
                        self.state_path)
            # Superseded best checkpoints go only now that the saved state names the new one: a run killed in
            # between still has the best checkpoint its state names.
            for checkpoint in self.run_dir.glob("gsasrec-*.pt"):
                if str(checkpoint) != self.progress.best_checkpoint:
                    checkpoint.unlink()

    def read_state(self) -> dict:
        """The saved training state (tensors and plain values only: utils.load_tensors_file), or a one-line error
        when the file is not one."""
        try:
            saved = load_tensors_file(self.state_path, "training state")
        except GSASRecError as error:
            raise GSASRecError(f"{error}; start over with --fresh or pass another --run-dir") from None
        missing = [key for key in STATE_KEYS if not isinstance(saved, dict) or key not in saved]
        if missing:
            raise GSASRecError(f"{self.state_path} is not a training state (no {', '.join(missing)}); start over "
                               "with --fresh or pass another --run-dir")
        return saved

    def load_state(self) -> None:
        saved = self.read_state()
        try:
            self.restore(saved)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
            detail = (str(error).strip().splitlines() or ["no details"])[0]
            raise GSASRecError(f"{self.state_path} is damaged ({type(error).__name__}: {detail}); start over with "
                               "--fresh or pass another --run-dir") from None
        if self.rank == 0:
            self.check_best_checkpoint()
            self.drop_unsaved_records()

    def restore(self, saved: dict) -> None:
        """The saved run into this trainer: weights, optimizer, schedule, progress and random streams."""
        try:
            saved_config = GSASRecExperimentConfig.from_dict(saved["config"])
        except GSASRecError as error:
            raise GSASRecError(f"{self.state_path} holds a config this version refuses: {error}") from None
        if comparable(saved_config) != comparable(self.config):
            raise GSASRecError(f"{self.run_dir} holds a run with a different config; pass --run-dir to start a "
                               "new run elsewhere or --fresh to overwrite it")
        weights = saved.get("training_model_state", saved["model_state"])
        check_tensors(weights, self.model.state_dict(), f"{self.state_path} is damaged", official=False)
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(saved["optimizer_state"])
        for group in self.optimizer.param_groups:
            # The saved run's kernel choice may not exist on this device: take this device's.
            group["fused"] = self.optimizer.defaults["fused"]
        self.scheduler.load_state_dict(saved["scheduler_state"])
        progress = Progress.from_dict(saved["progress"])
        # The kinds of value each field may hold, by its default's type (a number field holds no bool).
        kinds = {int: int, float: (int, float), type(None): (str, type(None))}
        wrong = [field.name for field in fields(Progress)
                 if not isinstance(value := getattr(progress, field.name), kinds.get(type(field.default), object))
                 or (isinstance(value, bool) and type(field.default) in (int, float))]
        if wrong:
            raise ValueError(f"its progress holds a wrong kind of value for {', '.join(wrong)}")
        vars(self.progress).update(vars(progress))
        if self.averaged is not None:
            self.averaged.module.load_state_dict(saved["model_state"])
            self.averaged.n_averaged.fill_(self.progress.step)  # one update a step; 0 makes the next one a copy
        self.progress.stopped = self.ending_reason()
        rng_states = saved["rng_states"]
        own = rng_states[self.rank] if len(rng_states) == self.world_size else None
        # A CPU generator's state (Mersenne Twister) and a CUDA one's (Philox) differ in size, not only in meaning.
        if own is not None and own["generator"].numel() == self.generator.get_state().numel():
            torch.set_rng_state(own["torch"])
            self.generator.set_state(own["generator"])
            if self.device.type == "cuda" and own["cuda"] is not None:
                torch.cuda.set_rng_state(own["cuda"], self.device)
        else:
            where = (f"with {len(rng_states)} process(es), resumed with {self.world_size}" if own is None
                     else f"on another kind of device than {self.device.type}")
            self.say(f"The run was saved {where}: random streams restart from the seed and the step")
            torch.manual_seed(self.config.seed + self.rank + self.progress.step)
            self.generator.manual_seed(self.config.seed + self.rank + self.progress.step)

    def check_best_checkpoint(self) -> None:
        """The best checkpoint is looked for by name in this run folder, which may have been moved or copied; when
        it is missing or damaged, the next validated model becomes the best, so the run still ends with one."""
        progress = self.progress
        if progress.best_checkpoint is None:
            return
        best = self.run_dir / Path(progress.best_checkpoint).name
        progress.best_checkpoint = str(best)
        try:
            read_checkpoint(best)
        except GSASRecError as error:
            self.say(f"Note: the best checkpoint is unusable ({error}); the next model validated from step "
                     f"{self.config.selection_start_step} on becomes the best")
            progress.best_checkpoint, progress.best_metric = None, -math.inf

    def drop_unsaved_records(self) -> None:
        """Log records after the saved state's step go: a run killed between logging an epoch and saving its
        state redoes that epoch, which would otherwise be logged twice. Lines that are not whole records (a
        write cut short, an edit) go too, with a note; every other record is kept."""
        path = self.run_dir / LOG_FILE
        if not path.is_file():
            return

        def step_of(line: str) -> int | None:
            try:
                record = json.loads(line)
            except ValueError:
                return None
            step = record.get("step") if isinstance(record, dict) else None
            return step if isinstance(step, int) and not isinstance(step, bool) else None

        text = path.read_text(errors="replace")
        steps = [(line, step_of(line)) for line in text.splitlines()]
        damaged = sum(step is None for _, step in steps)
        if damaged:
            self.say(f"Note: {path} had {damaged} damaged line(s); they are dropped and the other records kept")
        kept = "".join(f"{line}\n" for line, step in steps if step is not None and step <= self.progress.step)
        if kept != text:
            atomic_write(path, lambda temporary: temporary.write_text(kept))

    def tick(self) -> None:
        """Adds the wall-clock time since the last tick to the run's elapsed time."""
        now = time.perf_counter()
        self.progress.elapsed_seconds += now - self.clock
        self.clock = now

    def stop_reason(self, stop_request: StopRequest) -> str | None:
        """A budget or a signal; with several ranks, any rank's reason stops them all at the same step."""
        reasons = [None, "max_steps", "max_training_time", "interrupted"]
        code = 0
        if self.config.max_steps is not None and self.progress.step >= self.config.max_steps:
            code = 1
        elif (self.config.max_training_time is not None
              and self.progress.elapsed_seconds >= self.config.max_training_time):
            code = 2
        elif stop_request.requested:
            code = 3
        if self.world_size > 1:
            flag = torch.tensor([code], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        return reasons[code]

    def train_step(self, rows: np.ndarray) -> float:
        batch = training_batch(self.dataset, rows, self.config, self.generator).to(self.device)
        loss = self.objective(batch, self.generator)
        loss.backward()
        self.optimizer.step()
        # Freed now rather than at the next backward: a gradient made whole (under torchrun, or of an output table
        # scored over the catalogue) is 512 MB on a million items.
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        return loss.item()

    def evaluate(self, inputs, targets) -> dict[str, float]:
        config = self.config
        return evaluate(self.evaluated_model, inputs, targets, config.metrics, config.recommendation_limit,
                        config.filter_rated, config.eval_batch_size)

    def end_epoch(self) -> None:
        """Rank 0 validates, keeps the best checkpoint and logs; then every rank takes rank 0's state."""
        progress, config = self.progress, self.config
        if self.rank == 0:
            validation = self.evaluate(self.dataset.val_input, self.dataset.val_target)
            self.tick()
            record = {"step": progress.step, "epoch": progress.epoch, "time_s": round(progress.elapsed_seconds, 2),
                      "train_loss": progress.epoch_loss_sum / self.batches_per_epoch,
                      **{f"val_{name}": value for name, value in validation.items()}}
            if self.log_test_metrics:
                test = self.evaluate(self.dataset.test_input, self.dataset.test_target)
                record.update({f"test_{name}": value for name, value in test.items()})
            self.keep_if_best(validation)
            with open(self.run_dir / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")
            self.say(f"epoch {progress.epoch} step {progress.step} loss {record['train_loss']:.4f} " +
                     " ".join(f"{key} {value:.4f}" for key, value in record.items() if "@" in key) +
                     (f" | best {config.val_metric} {progress.best_metric:.4f}" if progress.best_checkpoint else
                      f" | selection from step {config.selection_start_step}") +
                     f" ({progress.elapsed_seconds:.0f}s)")
            progress.epoch += 1
            progress.batch_in_epoch = 0
            progress.stopped = self.ending_reason()
        if self.world_size > 1:
            shared = [progress]
            dist.broadcast_object_list(shared, src=0)
            vars(progress).update(vars(shared[0]))
        self.clock = time.perf_counter()  # test evaluation and waiting for rank 0 are not training time
        self.save_state()

    def ending_reason(self) -> str | None:
        """One of ENDING_REASONS or None, recomputed from the config, so a resumed run may raise max_epochs or the
        patience and go on."""
        if self.progress.epochs_without_improvement >= self.config.early_stopping_patience:
            return "early stopping"
        return "max_epochs" if self.progress.epoch >= self.config.max_epochs else None

    def training_record(self) -> dict:
        """How the weights were made, for checkpoints: training seconds and steps so far, and the machine."""
        return {"seconds": round(self.progress.elapsed_seconds, 3), "steps": self.progress.step,
                "world_size": self.world_size, **machine_description(self.device)}

    def keep_if_best(self, validation: dict[str, float]) -> None:
        progress = self.progress
        if progress.step < self.config.selection_start_step:
            return
        metric = validation[self.config.val_metric]
        if metric <= progress.best_metric:
            progress.epochs_without_improvement += 1
            return
        progress.best_metric = metric
        progress.epochs_without_improvement = 0
        best_path = self.run_dir / checkpoint_name(self.config, progress.step, metric)
        atomic_save(model_checkpoint(self.evaluated_model, self.config, step=progress.step, epoch=progress.epoch,
                                     val_metrics=validation, training=self.training_record()), best_path)
        progress.best_checkpoint = str(best_path)  # the previous one goes once the state names this one (save_state)

    def run(self) -> Progress:
        """Trains until early stopping, max_epochs, a budget or a signal; returns where the run stands."""
        progress, config = self.progress, self.config
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for unfinished in self.run_dir.glob(".*.tmp"):  # a write that a killed process did not finish
                unfinished.unlink()
        if not self.state_path.is_file() and self.rank == 0:
            self.drop_unsaved_records()  # a first epoch logged, then killed before its state was saved
        if self.state_path.is_file():
            self.load_state()
            if progress.finished:
                self.say(f"{self.run_dir} already finished ({progress.stopped}); "
                         f"best checkpoint: {progress.best_checkpoint}")
                return progress
            self.say(f"Resuming {self.run_dir} at step {progress.step} (epoch {progress.epoch})")
        if config.bf16 and not has_native_bf16(self.device):
            self.say(f"Note: the config asks for bf16, but this {self.device.type} has no native bf16 "
                     "(it would be emulated, about 10x slower): training in float32")
        stop_request = StopRequest(announce=self.rank == 0)
        self.model.train()
        self.clock = time.perf_counter()
        try:
            while not progress.finished:
                self.sampler.set_epoch(progress.epoch)
                shard = self.trainable_rows[np.fromiter(self.sampler, dtype=np.int64)]
                if progress.batch_in_epoch == 0:
                    progress.epoch_loss_sum = 0.0
                bar = tqdm(total=self.batches_per_epoch, initial=progress.batch_in_epoch,
                           disable=not self.show_progress, desc=f"epoch {progress.epoch}", leave=False)
                while progress.batch_in_epoch < self.batches_per_epoch:
                    reason = self.stop_reason(stop_request)
                    if reason:
                        self.tick()
                        progress.stopped = reason
                        self.save_state()
                        bar.close()
                        if reason == "max_steps" and 0 < config.lr_decay_steps <= progress.step - config.warmup_steps:
                            self.say(f"Finished the learning-rate schedule at step {progress.step}; best checkpoint: "
                                     f"{progress.best_checkpoint}")
                            return progress
                        how = ("rerun the same command" if reason == "interrupted" else
                               f"raise {reason} in the config and rerun the same command")
                        self.say(f"Stopped ({reason}) at step {progress.step}; {how} to continue.")
                        return progress
                    start = progress.batch_in_epoch * config.train_batch_size
                    loss = self.train_step(shard[start:start + config.train_batch_size])
                    progress.step += 1
                    progress.batch_in_epoch += 1
                    progress.epoch_loss_sum += loss
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.4f}")
                    self.tick()
                bar.close()
                self.end_epoch()
        finally:
            stop_request.restore()
        self.say(f"Finished ({progress.stopped}); best checkpoint: {progress.best_checkpoint}")
        return progress


def train(config: GSASRecExperimentConfig, dataset: DatasetSplit, run_dir: Path, device: torch.device,
          log_test_metrics: bool = False, progress: bool = True) -> Progress:
    """Trains (or resumes) the run in run_dir in this process; returns where the run stands."""
    return Trainer(config, dataset, run_dir, device, log_test_metrics=log_test_metrics, progress=progress).run()


def init_distributed(device_name: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device): under torchrun joins the process group (nccl on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, resolve_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and not (device_name or "").startswith("cpu")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world_size, device


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = CommandLineParser(__doc__)
    parser.add_argument("--config", required=True, help="config file defining `config = GSASRecExperimentConfig(...)`")
    parser.add_argument("--run-dir", help="folder for the state, log and best checkpoint (default: "
                                          "models/<config file name>, followed by -FIELD=VALUE for each --set "
                                          "and -seed<N> with --seed)")
    parser.add_argument("--fresh", action="store_true", help="discard a saved state in the run folder and start over")
    parser.add_argument("--seed", type=int, help="train with this seed instead of the config's (it is saved in the "
                                                     "checkpoints' config)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, parsed to its type (repeatable; e.g. --set gbce_t=1.0 "
                             "--set metrics=nDCG@10,R@10); saved in the checkpoints' config and in the default "
                             "run folder's name")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--source", help="path to ml-1m.txt when the ML-1M split must be prepared")
    parser.add_argument("--log-test-metrics", action="store_true",
                        help="also log test metrics after each epoch (for learning curves; never used for selection)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config), args.set)
    default_run_name = Path(args.config).stem + "".join(f"-{override.replace(' ', '')}" for override in args.set)
    if args.seed is not None:
        config = replace(config, seed=args.seed)
        default_run_name += f"-seed{args.seed}"
    run_dir = writable_folder(args.run_dir or Path("models") / default_run_name, "--run-dir")
    rank, world_size, device = init_distributed(args.device)
    if rank == 0:
        if args.fresh:
            for path in [run_dir / STATE_FILE, run_dir / LOG_FILE, *run_dir.glob("gsasrec-*.pt")]:
                path.unlink(missing_ok=True)
        ensure_dataset(config.dataset_name, args.source)
    if world_size > 1:
        dist.barrier()
    dataset = load_dataset(ensure_dataset(config.dataset_name, args.source))
    trainer = Trainer(config, dataset, run_dir, device, rank, world_size, args.log_test_metrics,
                      progress=not args.no_progress)
    progress = trainer.run()
    if world_size > 1:
        print(f"rank {rank}: stopped at epoch {progress.epoch} step {progress.step}, "
              f"weights {weights_digest(trainer.model)}", flush=True)
        dist.barrier()  # no rank tears down the process group while another still uses it
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"best_checkpoint": progress.best_checkpoint,
                          f"best_val_{config.val_metric}": progress.best_metric, "steps": progress.step,
                          "stopped": progress.stopped, "world_size": world_size}), flush=True)
    if world_size > 1:
        # Everything is saved and printed; a normal interpreter exit can still abort in gloo's background
        # threads ("terminate called without an active exception"), so a distributed rank leaves at once.
        os._exit(0)


if __name__ == "__main__":
    run_cli(main)
