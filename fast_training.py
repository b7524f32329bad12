"""The fast training engine: the loss, gradients and Adam updates of train_gsasrec.reference_loss with plain Adam
(tests/test_fast_training.py holds them equal), with far less work and memory on CPUs and large catalogues.

- length groups: on a CPU, rows go through the model in groups of similar length, each cut to its longest row;
- per-position negatives: each target's own rows (GatheredScores: on a CPU a sampled sparse product), or the
  catalogue product in blocks of rows, never kept whole (SampledCatalogueScores), whichever the first steps of a run
  time faster (ScoringPathTrial); the full softmax's normaliser likewise in blocks (CatalogueLogSumExp);
- item tables: gradients as bags of rows (ItemBags), and Adam's step taken inside backward block by block of rows
  (TableStep), so a million-row table's gradient never exists whole;
- dropout masks from as few random bits as the rate needs (BitFieldDropout).
docs/architecture.md shows the seam; docs/performance.md has the measurements behind each path and constant.
"""
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adam import adam

from config import SCORING_PATHS, GSASRecError, GSASRecExperimentConfig
from dataset_utils import length_groups
from eval_utils import has_native_bf16
from gsasrec import GSASRec, gbce_loss, logq_shift, sampled_softmax_loss, softmax_loss

# Tuning constants.
# Padding a CPU length group may take on before it closes: every group also costs fixed work.
CPU_GROUP_PADDING = 256
# Timed training steps of each way of scoring per-position negatives under per_position_scoring="auto", after one
# untimed warm-up step (docs/performance.md).
TRIAL_STEPS_PER_PATH = 5
# A way whose fastest step so far is this many times the other's loses at once.
TRIAL_CLEAR_FACTOR = 4.0
# Catalogues larger than this are not tried through the catalogue product: a block of its scores would pass 64 MB
# (gigabytes at a million items, where a step of it takes 50 times a gathered one).
TRIAL_MAX_CATALOGUE_ITEMS = 2 ** 26 // (4 * 256)
# Target rows per block of the catalogue product: a block's scores stay in cache and every product has one shape
# (oneDNN's bf16 kernels are rebuilt for every new shape).
CATALOGUE_BLOCK_ROWS = 256
# Numbers of gathered (rows, k, E) embeddings per chunk (4 MB in float32): they stay in cache for their product.
GATHERED_NUMBERS_PER_CHUNK = 2 ** 20
# Table rows per block of Adam's step in backward: gradient, parameters and moments stay in cache together.
TABLE_STEP_BLOCK_ROWS = 8192


class BitFieldDropout(nn.Module):
    """Inverted dropout whose CPU mask takes only as many random bits per element as the rate needs.

    On CPUs drawing one random number per element (bernoulli_, rand) dominates a training step. A rate that is a
    multiple of 2^-b for b in (1, 2, 4, 8) takes b-bit fields of random bytes (one bit for 0.5); any other rate
    takes 16 bits and is rounded to a multiple of 2^-16. Kept values are scaled by the exact inverse keep
    probability. CUDA keeps PyTorch's fused kernel."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate
        self.bits = next((bits for bits in (1, 2, 4, 8) if (rate * 2 ** bits).is_integer()), 16)
        dropped = round(rate * 2 ** self.bits)
        self.scale = 2 ** self.bits / (2 ** self.bits - dropped)
        if self.bits == 16:
            # Signed draws, uniform on [-2^15, 2^15): kept from dropped - 2^15 up.
            self.threshold = dropped - 2 ** 15
        else:
            # The fields of a byte, compared in place: field j (value v at bit offset j * bits) is kept when
            # byte & field_mask_j >= dropped << offset_j, i.e. when v >= dropped.
            offsets = torch.arange(0, 8, self.bits, dtype=torch.int32)[:, None]
            self.register_buffer("field_masks", ((2 ** self.bits - 1) << offsets).to(torch.uint8), persistent=False)
            self.register_buffer("field_thresholds", (dropped << offsets).to(torch.uint8), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        if x.is_cuda:
            return F.dropout(x, self.rate, training=True)
        count = x.numel()
        # The full signed range: random_() alone leaves the top bit of every word zero.
        words = torch.empty(-(-count * self.bits // 64), dtype=torch.int64, device=x.device).random_(
            -2 ** 63, 2 ** 63 - 1)
        if self.bits == 16:
            keep = words.view(torch.int16)[:count] >= self.threshold
        else:
            # One row per field: long rows keep the comparison vectorised.
            keep = ((words.view(torch.uint8) & self.field_masks) >= self.field_thresholds).view(-1)[:count]
        return x * keep.view(x.shape).to(x.dtype).mul_(self.scale)


class SampledCatalogueScores(torch.autograd.Function):
    """Scores of each target's own negatives, (n, k), through the catalogue product hidden @ table.T computed in
    fixed-size blocks of rows and never kept. The backward rebuilds each block's gradient from the (n, k) one for
    the table's gradient, and takes the hidden gradient as GatheredScores does, with an embedding_bag (exact in
    float32, and no slower than a second product). With dtype bf16 the products run in bf16; scores are float32."""

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


class ItemBags:
    """A table's gradient whose row i sums weight * source row over the pairs that drew item i: with the pairs
    ordered by item, each row is one bag of source rows, so any block of rows is one embedding_bag. Pair p's source
    row is p // pairs_per_source; weights None for all ones. No zeroed table, no (rows, k, E) contributions."""

    def __init__(self, items: torch.Tensor, pairs_per_source: int, source_rows: torch.Tensor,
                 weights: torch.Tensor | None, num_rows: int):
        # The narrowest keys sort fastest: int16 in about a third of int64's time, int32 in half.
        key_type = torch.int16 if num_rows <= torch.iinfo(torch.int16).max + 1 else torch.int32
        items, order = items.flatten().to(key_type).sort(stable=True)
        self.counts = torch.bincount(items, minlength=num_rows)
        self.bounds = F.pad(self.counts.cumsum(0), (1, 0))  # row i's pairs: bounds[i] to bounds[i + 1]
        # index_select: about 3x as fast as indexing with a tensor.
        self.weights = None if weights is None else weights.flatten().index_select(0, order)
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


class TableStep:
    """Adam's step of one item table, taken inside backward from its gradient's bags, block by block of rows, so the
    gradient never exists whole. The state and settings are the table's own
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


def sampled_products(hidden: torch.Tensor, table: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """hidden[i] . table[columns[i, j]], (n, k), as a sampled dense-dense product (SDDMM): each stored entry of a CSR
    pattern whose row i holds columns[i] in their order, repeats allowed. The CPU kernel computes every stored entry
    on its own, so the pattern need not be sorted or distinct (tests/test_fast_training.py holds it to a gather)."""
    count, k = columns.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(torch.arange(0, count * k + 1, k, dtype=columns.dtype, device=columns.device),
                                          columns.flatten(),
                                          torch.zeros(count * k, dtype=hidden.dtype, device=hidden.device),
                                          (count, len(table)), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, hidden, table.T, beta=0.0).values().view(count, k)


class ScoringPathTrial:
    """Which way training_loss scores per-position negatives: a fixed per_position_scoring as it is; "auto" times
    whole training steps and keeps the faster way. After one untimed warm-up step the two ways alternate (the same
    loss and gradients), each step timed from its call to the next, per target it scored (batches differ); the
    fastest step of each decides, since other work on the machine only ever slows a step down; catalogues past
    TRIAL_MAX_CATALOGUE_ITEMS are gathered untried. Which wins depends on the catalogue and on whether the CPU
    multiplies bf16 natively (docs/performance.md)."""

    def __init__(self, setting: str, num_items: int):
        self.path = None if setting == "auto" else setting
        if self.path is None and num_items > TRIAL_MAX_CATALOGUE_ITEMS:
            self.path = "gathered"
        self.seconds: dict[str, list[float]] = {path: [] for path in SCORING_PATHS}  # per target, step by step
        # The step being timed: its way (None for the warm-up), its start and its targets.
        self.running: tuple[str | None, float, int] | None = None
        self.recorded: dict[str, float] = {}  # a resumed run's timings

    def next_path(self, targets: int) -> str:
        """The way for the step about to start, which scores `targets` targets (while timing, the previous step
        ends here)."""
        if self.path is not None:
            return self.path
        now = time.perf_counter()
        if self.running is None:
            self.running = (None, now, targets)
            return SCORING_PATHS[0]
        path, started, running_targets = self.running
        if path is not None:
            self.seconds[path].append((now - started) / max(running_targets, 1))
        timings = self.microseconds_per_target()
        timed = sum(len(seconds) for seconds in self.seconds.values())
        clear = len(timings) == 2 and max(timings.values()) > TRIAL_CLEAR_FACTOR * min(timings.values())
        if clear or timed == TRIAL_STEPS_PER_PATH * len(SCORING_PATHS):
            self.path = min(timings, key=timings.get)
            return self.path
        self.running = (SCORING_PATHS[(timed + 1) % len(SCORING_PATHS)], now, targets)
        return self.running[0]

    def microseconds_per_target(self) -> dict[str, float]:
        """Each way's fastest step so far, in microseconds per target scored (to 0.01)."""
        measured = {path: round(min(seconds) * 1e6, 2) for path, seconds in self.seconds.items() if seconds}
        return measured or self.recorded

    def resume(self, path: str, timings: dict[str, float]) -> None:
        """A resumed run keeps the way its trial chose, so it goes on as it would have (to the bit)."""
        if self.path is None and path in SCORING_PATHS:
            self.path, self.recorded = path, timings


class GatheredScores(torch.autograd.Function):
    """Scores of each target's own k negatives, (n, k): on a CPU a sampled sparse product (sampled_products), else
    hidden rows dotted with their gathered table rows in chunks of rows, so the (n, k, E) embeddings never exist
    at once. The backward needs no (n, k, E) either: the
    hidden gradient is an embedding_bag of the table weighted by the score gradient, and the table gradient bags
    of the hidden rows (ItemBags): dense, sparse (the rows drawn), or taken by a TableStep."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, table: torch.Tensor, negatives: torch.Tensor, sparse: bool,
                table_step: TableStep | None) -> torch.Tensor:
        ctx.save_for_backward(hidden, table, negatives)
        ctx.sparse, ctx.table_step = sparse, table_step
        if hidden.device.type == "cpu" and negatives.shape[1] <= len(table):  # more, and the product refuses
            return sampled_products(hidden, table, negatives)
        chunk = max(1, GATHERED_NUMBERS_PER_CHUNK // (negatives.shape[1] * hidden.shape[1]))
        # Rows gathered as bags of one: faster than F.embedding's index_select on large tables.
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
        hidden = model.encode(item_vectors[:, -width + 1:], input != model.padding_id).float()
    target_hidden, target_labels = hidden.flatten(0, 1).index_select(0, targets), labels.flatten()[targets]
    if negatives is None:
        return GroupScores(target_hidden, target_labels, None)
    embeddings = F.embedding(negatives, model.output_item_embeddings, sparse=model.item_embedding.sparse)
    negative = torch.bmm(hidden, embeddings.transpose(1, 2)).flatten(0, 1).index_select(0, targets)
    return GroupScores(target_hidden, target_labels, negative)


def training_loss(model: GSASRec, batch: torch.Tensor, negatives: torch.Tensor | None,
                  config: GSASRecExperimentConfig, beta: float, table_steps: TableSteps = TableSteps(),
                  scoring_path: str = "gathered") -> torch.Tensor:
    """train_gsasrec.reference_loss, fast: the config's loss over every non-padded position of a (batch, width)
    window, negatives as train_gsasrec.sample_negatives draws them. table_steps: the item tables that backward
    steps (AdamWithSeparateTables.table_steps); scoring_path: one of SCORING_PATHS for per-position negatives.

    On a CPU, rows go through score_group in groups of similar length: the same loss as one padded pass
    (sequences do not interact), with fewer positions. Positives and per-position negatives are scored after all
    groups, all targets at once: one gradient of the output table instead of one a group."""
    is_target = batch[:, :-1] != model.padding_id
    sampled = config.loss != "softmax"
    per_sequence = sampled and config.negative_sampling == "per_sequence"
    lengths = (batch != model.padding_id).sum(1)
    on_cpu = batch.device.type == "cpu"
    groups = ([torch.from_numpy(group) for group in length_groups(lengths.numpy(), max_padding=CPU_GROUP_PADDING)]
              if on_cpu else [torch.arange(len(batch), device=batch.device)])
    sizes = [len(group) for group in groups]
    grouped = batch[torch.cat(groups)]
    # The input vectors of every group in one lookup: one gradient of the item table, not one per group.
    ids = grouped[:, :-1]
    item_vectors = (model.item_embedding(ids) if table_steps.input is None else
                    ItemLookup.apply(model.item_embedding.weight, ids, table_steps.input)).split(sizes)
    scores = [score_group(model, rows, rows_vectors, negatives[group] if per_sequence else None, config)
              for group, rows, rows_vectors in zip(groups, grouped.split(sizes), item_vectors)]
    hidden = torch.cat([group.hidden for group in scores])
    labels = torch.cat([group.labels for group in scores])
    per_position = config.per_position_negatives
    if per_position:
        # The draw is in row-major order of the targets (target_numbers): the hidden states are put in that order,
        # not the negatives, which are larger (k int64 ids a target against E floats: 4 times on ML-1M).
        target_numbers = is_target.flatten().cumsum(0).view(is_target.shape) - 1
        grouped_numbers = torch.cat([target_numbers[group][is_target[group]] for group in groups])
        in_draw_order = torch.empty_like(grouped_numbers)
        in_draw_order[grouped_numbers] = torch.arange(len(grouped_numbers), device=batch.device)
        hidden, labels = hidden[in_draw_order], labels[in_draw_order]
    table, sparse = model.output_item_embeddings, model.item_embedding.sparse
    catalogue_dtype = torch.bfloat16 if config.bf16_scores and has_native_bf16(batch.device) else torch.float32
    gathered = per_position and scoring_path == "gathered"
    if not gathered:
        positive = (hidden * F.embedding(labels, table, sparse=sparse)).sum(-1)
    if not sampled:
        return softmax_loss(positive, CatalogueLogSumExp.apply(hidden, table, catalogue_dtype, sparse))
    if per_sequence:
        negative = torch.cat([group.negative for group in scores])
    else:
        if gathered:
            # Each target's own rows, its positive in column 0, so the table gets one gradient instead of two to add;
            # int32 ids, half the bytes of int64 to write and read.
            columns = torch.empty(len(labels), negatives.shape[1] + 1, dtype=torch.int32, device=labels.device)
            columns[:, 0], columns[:, 1:] = labels, negatives
            scored = GatheredScores.apply(hidden, table, columns, sparse, table_steps.output)
            positive, negative = scored[:, 0], scored[:, 1:]
        else:
            # The catalogue scored and each target's k picked out: no (n, k, E), and fast products where bf16 is native.
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


def build_optimizer(model: GSASRec, config: GSASRecExperimentConfig, in_backward: bool, fused: bool
                    ) -> AdamWithSeparateTables:
    """Adam at the config's learning rate (with PyTorch's fused kernel where fused). The item tables are stepped in
    backward (in_backward; not under DistributedDataParallel, which averages gradients after backward), or with
    sparse_item_updates updated lazily (AdamWithSeparateTables)."""
    tables = list({id(table): table for table in (model.item_embedding.weight, model.output_item_embeddings)}.values())
    dense = [parameter for parameter in model.parameters() if all(parameter is not table for table in tables)]
    return AdamWithSeparateTables(dense, tables, config.learning_rate, fused, config.sparse_item_updates, in_backward)

