"""The gSASRec network: SASRec's causal Transformer with a separate output item embedding.

Importable on its own (torch only). Item ids run 1..num_items, num_items + 1 is padding, 0 is never an item.
Sequences are left-padded; the prediction for a sequence is read at its last position.
"""
import functools
import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


# Catalogues of at least this many items are ranked in two passes on CPUs with native bf16 (screened_top_items): on
# a million items the bf16 product is 3-4x as fast as float32's; on ML-1M's 3,416 the product is not what costs.
BF16_SCREEN_MIN_ITEMS = 100_000
# Items per sequence that the bf16 pass hands to float32.
SCREEN_CANDIDATES = 256
# Queries per call of the fused attention kernel in CPU evaluation (CausalAttention.attention).
CPU_QUERY_CHUNK = 64


@functools.cache
def has_native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively: CUDA GPUs that support bf16, CPUs with AVX512-BF16 or AMX.

    Elsewhere (AVX2-only CPUs, most laptops) PyTorch emulates bf16 and a training step is about 10x slower.
    Cached: the training loss asks on every step."""
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


class ScreeningTable(NamedTuple):
    """The output table in bf16 and the largest norm of its float32 rows, made once for many batches."""
    table: torch.Tensor
    largest_norm: torch.Tensor


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


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The attention mask as a bias added to the logits: 0 where `allowed`, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class CausalAttention(nn.Module):
    """What both blocks share: heads split from single E x E projections, and causal attention whose weights may
    get dropout."""

    def __init__(self, num_heads: int, dropout_rate: float):
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout = BitFieldDropout(dropout_rate)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, heads, length, head_dim = x.shape
        return x.transpose(1, 2).reshape(batch, length, heads * head_dim)

    @property
    def drops_attention(self) -> bool:
        """Whether attention weights get dropout, which needs the explicit attention path and its mask tensor."""
        return self.training and self.attention_dropout.rate > 0

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_bias: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d) + bias) V per head. PyTorch's fused kernel where the weights get no dropout (in
        query chunks in CPU evaluation); with dropout, the same product written out, so the weights go through
        BitFieldDropout (a test holds the two equal)."""
        if causal and not self.training and query.device.type == "cpu" and query.shape[2] > CPU_QUERY_CHUNK:
            return self.chunked_causal_attention(query, key, value, attention_bias)
        if not self.drops_attention:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_bias,
                                                  is_causal=causal and attention_bias is None)
        # One baddbmm scales the logits and adds the mask: two fewer passes over (batch, heads, L, L).
        batch, heads, length, head_dim = query.shape
        bias = attention_bias.expand(batch, heads, length, key.shape[2]).reshape(batch * heads, length, -1)
        logits = torch.baddbmm(bias, query.reshape(-1, length, head_dim),
                               key.reshape(-1, key.shape[2], head_dim).transpose(1, 2), alpha=head_dim ** -0.5)
        weights = self.attention_dropout(logits.softmax(-1))
        return (weights @ value.reshape(-1, key.shape[2], head_dim)).view(batch, heads, length, head_dim)

    def chunked_causal_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attention_bias: torch.Tensor | None) -> torch.Tensor:
        """Causal attention in chunks of CPU_QUERY_CHUNK queries, each over the keys up to its end. PyTorch's CPU
        kernel reads every key of the call whatever the mask, so chunks skip most of the keys a causal mask hides
        (ML-1M's test evaluation: attention 474-571 ms against 607-657 ms in one call)."""
        length = query.shape[2]
        if attention_bias is None:
            attention_bias = additive_mask(torch.ones(length, length, dtype=torch.bool, device=query.device).tril(),
                                           query.dtype)
        chunks = []
        for start in range(0, length, CPU_QUERY_CHUNK):
            end = start + CPU_QUERY_CHUNK
            chunks.append(F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, :end], value[:, :, :end],
                                                         attn_mask=attention_bias[..., start:end, :end]))
        return torch.cat(chunks, dim=2)


class SelfAttentionBlock(CausalAttention):
    """One SASRec block: queries from LayerNorm(x), keys/values from x, no output projection,
    then a point-wise feed-forward with a residual."""

    def __init__(self, embedding_dim: int, num_heads: int, dropout_rate: float):
        super().__init__(num_heads, dropout_rate)
        self.attention_norm = nn.LayerNorm(embedding_dim, eps=1e-8)
        self.query = nn.Linear(embedding_dim, embedding_dim)
        self.key = nn.Linear(embedding_dim, embedding_dim)
        self.value = nn.Linear(embedding_dim, embedding_dim)
        self.feed_forward_norm = nn.LayerNorm(embedding_dim, eps=1e-8)
        self.feed_forward = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim), nn.ReLU(), BitFieldDropout(dropout_rate),
            nn.Linear(embedding_dim, embedding_dim), BitFieldDropout(dropout_rate))

    def forward(self, seq: torch.Tensor, attention_bias: torch.Tensor | None, is_item: torch.Tensor,
                last_position_only: bool = False, key_value: torch.Tensor | None = None) -> torch.Tensor:
        """attention_bias: (batch, 1, L, L), 0 where a query may attend to a key and -inf elsewhere; None for
        plain causal attention (no padding), which needs no mask tensor. With
        last_position_only, only the last position's output is computed (keys still span the sequence).
        key_value: (batch, L, 2E), this block's keys and values of seq where the caller has them already."""
        if last_position_only and not self.drops_attention:
            return self.last_position_output(seq, attention_bias, is_item)
        normed = self.attention_norm(seq[:, -1:] if last_position_only else seq)
        query = self.split_heads(self.query(normed))
        key, value = key_value.chunk(2, dim=-1) if key_value is not None else (self.key(seq), self.value(seq))
        key, value = self.split_heads(key), self.split_heads(value)
        if last_position_only and attention_bias is not None:
            attention_bias = attention_bias[:, :, -1:]
        # The last position may attend to every key: with no mask there is nothing to hide from it.
        attended = self.attention(query, key, value, attention_bias, causal=not last_position_only)
        output = self.feed_forward_output(normed + self.merge_heads(attended))
        return output * (is_item[:, -1:] if last_position_only else is_item)

    def feed_forward_output(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feed_forward_norm(x)
        return x + self.feed_forward(x)

    def last_position_output(self, seq: torch.Tensor, attention_bias: torch.Tensor | None, is_item: torch.Tensor
                             ) -> torch.Tensor:
        """forward's last position without projecting every position's key and value (2 of evaluation's 7
        per-position matrix products): per head q . (W_k x + b_k) = (W_k^T q) . x + q . b_k, whose last term is the
        same for every key and cancels in the softmax, and sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v."""
        normed = self.attention_norm(seq[:, -1:])
        heads, head_dim = self.num_heads, seq.shape[-1] // self.num_heads
        query = self.query(normed).view(len(seq), 1, heads, head_dim).transpose(1, 2)
        folded_query = query @ self.key.weight.view(heads, head_dim, -1)
        positions = seq.unsqueeze(1).expand(-1, heads, -1, -1)
        last_bias = None if attention_bias is None else attention_bias[:, :, -1:]
        context = F.scaled_dot_product_attention(folded_query, positions, positions, last_bias, scale=head_dim ** -0.5)
        attended = self.merge_heads(context @ self.value.weight.view(heads, head_dim, -1).transpose(1, 2))
        return self.feed_forward_output(normed + attended + self.value.bias) * is_item[:, -1:]


class SwiGLU(nn.Module):
    """The gated feed-forward W2 (SiLU(W x) * V x) of Shazeer's "GLU Variants Improve Transformer", without
    biases; W and V are one (2H x E) product."""

    def __init__(self, embedding_dim: int, hidden_dim: int, dropout_rate: float):
        super().__init__()
        self.gate_and_value = nn.Linear(embedding_dim, 2 * hidden_dim, bias=False)
        self.dropout = BitFieldDropout(dropout_rate)
        self.output = nn.Linear(hidden_dim, embedding_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.gate_and_value(x).chunk(2, dim=-1)
        return self.output(self.dropout(F.silu(gate) * value))


class LiGRBlock(CausalAttention):
    """The LiGR block (LinkedIn's "From Features to Transformers", as eSASRec uses it): pre-LayerNorm attention
    with an output projection, a SwiGLU feed-forward, and residuals whose added branch is gated by
    sigmoid(linear(x)) of the stream it joins: x + sigmoid(G1 x) * Attn(LN1 x), then h + sigmoid(G2 h) * FFN(LN2 h)."""

    def __init__(self, embedding_dim: int, num_heads: int, dropout_rate: float, feed_forward_multiplier: int):
        super().__init__(num_heads, dropout_rate)
        self.attention_norm = nn.LayerNorm(embedding_dim, eps=1e-8)
        self.query_key_value = nn.Linear(embedding_dim, 3 * embedding_dim)
        self.attention_output = nn.Linear(embedding_dim, embedding_dim)
        self.attention_branch_dropout = BitFieldDropout(dropout_rate)
        self.attention_gate = nn.Linear(embedding_dim, embedding_dim)
        self.feed_forward_norm = nn.LayerNorm(embedding_dim, eps=1e-8)
        self.feed_forward = SwiGLU(embedding_dim, feed_forward_multiplier * embedding_dim, dropout_rate)
        self.feed_forward_branch_dropout = BitFieldDropout(dropout_rate)
        self.feed_forward_gate = nn.Linear(embedding_dim, embedding_dim)

    def forward(self, seq: torch.Tensor, attention_bias: torch.Tensor | None, is_item: torch.Tensor,
                last_position_only: bool = False) -> torch.Tensor:
        """As SelfAttentionBlock.forward."""
        query, key, value = self.query_key_value(self.attention_norm(seq)).chunk(3, dim=-1)
        if last_position_only:
            seq, query = seq[:, -1:], query[:, -1:]
            if attention_bias is not None:
                attention_bias = attention_bias[:, :, -1:]
        attended = self.attention(self.split_heads(query.contiguous()), self.split_heads(key.contiguous()),
                                  self.split_heads(value.contiguous()), attention_bias, causal=not last_position_only)
        attended = self.attention_branch_dropout(self.attention_output(self.merge_heads(attended)))
        seq = seq + torch.sigmoid(self.attention_gate(seq)) * attended
        fed = self.feed_forward_branch_dropout(self.feed_forward(self.feed_forward_norm(seq)))
        seq = seq + torch.sigmoid(self.feed_forward_gate(seq)) * fed
        return seq * (is_item[:, -1:] if last_position_only else is_item)


class GSASRec(nn.Module):
    """SASRec's architecture (with block="ligr", LiGR blocks instead of SASRec's); scores are dot products of the last
    hidden state with an output item table that is separate from the input one unless reuse_item_embeddings
    (vanilla SASRec). With sparse_item_gradients the item tables get sparse gradients (rows a batch touched only),
    for torch.optim.SparseAdam on large catalogues."""

    def __init__(self, num_items: int, sequence_length: int = 200, embedding_dim: int = 256, num_heads: int = 4,
                 num_blocks: int = 3, dropout_rate: float = 0.0, reuse_item_embeddings: bool = False,
                 embedding_init_std: float | None = None, initial_score: float | None = None,
                 sparse_item_gradients: bool = False, block: str = "sasrec", feed_forward_multiplier: int = 4):
        super().__init__()
        for name, value in (("num_items", num_items), ("sequence_length", sequence_length),
                            ("embedding_dim", embedding_dim), ("num_heads", num_heads), ("num_blocks", num_blocks),
                            ("feed_forward_multiplier", feed_forward_multiplier)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be a whole number, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if embedding_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide embedding_dim ({embedding_dim})")
        if not (isinstance(dropout_rate, (int, float)) and 0 <= dropout_rate < 1):
            raise ValueError(f"dropout_rate must be a number in [0, 1), got {dropout_rate!r}")
        if not (embedding_init_std is None or (isinstance(embedding_init_std, (int, float))
                                               and 0 < embedding_init_std < math.inf)):
            raise ValueError(f"embedding_init_std must be a number > 0 or None, got {embedding_init_std!r}")
        blocks = {"sasrec": lambda: SelfAttentionBlock(embedding_dim, num_heads, dropout_rate),
                  "ligr": lambda: LiGRBlock(embedding_dim, num_heads, dropout_rate, feed_forward_multiplier)}
        if block not in blocks:
            raise ValueError(f"block must be one of {tuple(blocks)}, got {block!r}")
        self.num_items = num_items
        self.padding_id = num_items + 1
        self.sequence_length = sequence_length
        self.embedding_dim = embedding_dim
        self.item_embedding = nn.Embedding(num_items + 2, embedding_dim, sparse=sparse_item_gradients)
        self.position_embedding = nn.Embedding(sequence_length, embedding_dim)
        self.embedding_dropout = BitFieldDropout(dropout_rate)
        self.blocks = nn.ModuleList(blocks[block]() for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(embedding_dim, eps=1e-8)
        self.reuse_item_embeddings = reuse_item_embeddings
        if not reuse_item_embeddings:
            self.output_embedding = nn.Embedding(num_items + 2, embedding_dim, sparse=sparse_item_gradients)
        if embedding_init_std is not None:
            for module in self.modules():
                if isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, std=embedding_init_std)
        if initial_score is not None:
            self.start_scores_at(initial_score)

    @torch.no_grad()
    def start_scores_at(self, score: float) -> None:
        """Initialises every item's score near `score`, as a classifier's bias is set to the prior log-odds.

        The model has no output bias, but the final LayerNorm's bias can act as one: its output minus the bias
        has zero mean over features, so with that bias all ones, a shift of score / E on every output embedding
        adds exactly `score` to every score. Starting near log(1 / num_items) leaves the sampled negatives
        near their optimum; from a zero start, pushing them down first collapses the hidden state to a
        popularity model, which with many negatives takes thousands of steps to undo."""
        self.final_norm.bias.fill_(1.0)
        self.output_item_embeddings.add_(score / self.embedding_dim)

    @property
    def output_item_embeddings(self) -> torch.Tensor:
        """The (num_items + 2, E) table scores are dot products with."""
        table = self.item_embedding if self.reuse_item_embeddings else self.output_embedding
        return table.weight

    def forward(self, input: torch.Tensor, last_position_only: bool = False,
                item_vectors: torch.Tensor | None = None, first_block_tables: FirstBlockTables | None = None
                ) -> torch.Tensor:
        """(batch, length) left-padded item ids -> (batch, length, E) hidden states ((batch, 1, E) with
        last_position_only, which skips the last block's work on every other position).

        A length shorter than sequence_length is read as the rightmost part of a full window, so cutting
        away columns of pure padding changes nothing. item_vectors: input's rows of the item table when the
        caller has looked them up already (training does it once for all its length groups).
        first_block_tables (self.first_block_tables(), eval mode only) give the same outputs with less work."""
        check_id_tensor("input", input)  # its kind and shape only: forward runs on every training step
        length = input.shape[1]
        if length > self.sequence_length:
            raise ValueError(f"input length {length} exceeds sequence_length {self.sequence_length}")
        is_item = (input != self.padding_id).unsqueeze(-1)
        positions = torch.arange(self.sequence_length - length, self.sequence_length, device=input.device)
        key_value = None
        if first_block_tables is not None:
            if self.training:
                raise ValueError("first_block_tables hold only without dropout: call model.eval() first")
            # At padding the keys and values differ from the layers' outputs; no real position attends there.
            looked_up = F.embedding(input, first_block_tables.items).add_(first_block_tables.positions[positions])
            seq, key_value = looked_up.split([self.embedding_dim, 2 * self.embedding_dim], dim=-1)
        else:
            seq = (self.item_embedding(input) if item_vectors is None else item_vectors) + self.position_embedding(
                positions)
        seq = self.embedding_dropout(seq) * is_item
        attention_bias = None
        # Padding, and the explicit attention that dropout needs (SelfAttentionBlock.drops_attention), need the mask
        # as a tensor; otherwise plain causal attention needs none.
        if not bool(is_item.all()) or any(block.drops_attention for block in self.blocks):
            causal = torch.ones(length, length, dtype=torch.bool, device=input.device).tril()
            # Keys are real items; each position also sees itself so rows of padding never become all-masked.
            allowed = causal & (is_item.transpose(1, 2) | torch.eye(length, dtype=torch.bool, device=input.device))
            attention_bias = additive_mask(allowed, seq.dtype).unsqueeze(1)
        for index, block in enumerate(self.blocks):
            last = last_position_only and index == len(self.blocks) - 1
            if index == 0 and key_value is not None:
                seq = block(seq, attention_bias, is_item, last, key_value)
            else:
                seq = block(seq, attention_bias, is_item, last)
        return self.final_norm(seq)

    @torch.no_grad()
    def first_block_tables(self) -> FirstBlockTables | None:
        """Without dropout a first SASRec block's keys are W_k (e_item + e_position) + b_k = (W_k e_item) +
        (W_k e_position + b_k), and so are its values: with these tables, two of its five matrix products per
        position become part of the embedding lookup. None where there is nothing to save (a LiGR block, whose
        keys follow a LayerNorm, or a single block, whose keys last_position_output folds away). The tables
        hold for the current weights: an evaluation makes them once for all its forward passes."""
        block = self.blocks[0]
        if not isinstance(block, SelfAttentionBlock) or len(self.blocks) == 1:
            return None
        weight, bias = torch.cat([block.key.weight, block.value.weight]), torch.cat([block.key.bias, block.value.bias])
        items, positions = self.item_embedding.weight, self.position_embedding.weight
        return FirstBlockTables(torch.cat([items, F.linear(items, weight)], dim=1),
                                torch.cat([positions, F.linear(positions, weight, bias)], dim=1))

    @torch.no_grad()
    def get_predictions(self, input: torch.Tensor, limit: int, rated: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-`limit` (item ids, scores) per sequence over the full catalogue.

        Id 0, the padding id and, if given, the `rated` ids ((batch, n) tensor, padding_id where unused)
        are never returned. The ids are checked here, not in forward, which training calls on every step."""
        self.check_ids("input", input)
        if rated is not None:
            self.check_ids("rated", rated)
            if len(rated) != len(input):
                raise ValueError(f"rated must have a row for each of the {len(input)} input rows, got {len(rated)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= self.num_items:
            raise ValueError(f"limit must be a whole number in 1..{self.num_items} (the catalogue), got {limit!r}")
        return self.top_items(self.forward(input, last_position_only=True)[:, -1, :], limit, rated)

    def check_ids(self, name: str, ids: torch.Tensor) -> None:
        """A ValueError naming the argument unless ids is a 2-D integer tensor of item ids 1..num_items or the
        padding id: an id out of range would otherwise fail deep inside the embedding lookup."""
        check_id_tensor(name, ids)
        if ids.numel() and not bool(((ids >= 1) & (ids <= self.padding_id)).all()):
            raise ValueError(f"{name} holds ids outside 1..{self.num_items} (the items) and {self.padding_id} "
                             "(padding)")

    @torch.no_grad()
    def top_items(self, last_hidden: torch.Tensor, limit: int, rated: torch.Tensor | None = None,
                  screening_table: ScreeningTable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """get_predictions from the (batch, E) last hidden states, so scoring can run in larger batches. Large
        catalogues are ranked in two passes on CPUs with native bf16 (screened_top_items), with the same items;
        a caller that ranks many batches makes self.screening_table() once and passes it."""
        if screening_table is None:
            screening_table = self.screening_table()
        if screening_table is not None:
            return self.screened_top_items(last_hidden, limit, rated, screening_table)
        return self.float32_top_items(last_hidden, limit, rated)

    def float32_top_items(self, last_hidden: torch.Tensor, limit: int, rated: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """top_items from the whole catalogue scored in float32."""
        scores = self.without_non_candidates(last_hidden @ self.output_item_embeddings.T, rated)
        top_scores, top_items = scores.topk(limit, dim=1)
        return top_items, top_scores

    def without_non_candidates(self, scores: torch.Tensor, rated: torch.Tensor | None) -> torch.Tensor:
        """Catalogue scores with id 0, the padding id and the `rated` ids set to -inf, in place."""
        scores[:, 0] = float("-inf")
        scores[:, self.padding_id] = float("-inf")
        if rated is not None:
            # index_put_ rather than scatter_, which copies a bf16 table whole (0.3 s for 67 users x 1M items).
            rows = torch.arange(len(scores), device=scores.device).unsqueeze(1).expand(rated.shape)
            scores.index_put_((rows, rated.to(torch.int64)), torch.tensor(float("-inf"), dtype=scores.dtype,
                                                                           device=scores.device))
        return scores

    def screening_table(self) -> ScreeningTable | None:
        """What top_items' bf16 pass needs where it ranks in two passes (BF16_SCREEN_MIN_ITEMS items or more, a
        CPU with native bf16, whose products add in float32), else None. Making it for a million rows takes
        about as long as the bf16 product of 67 users."""
        table = self.output_item_embeddings.detach()
        if self.num_items >= BF16_SCREEN_MIN_ITEMS and table.device.type == "cpu" and has_native_bf16(table.device):
            return ScreeningTable(table.bfloat16(), table.norm(dim=1).max())
        return None

    @torch.no_grad()
    def screened_top_items(self, last_hidden: torch.Tensor, limit: int, rated: torch.Tensor | None,
                           screening_table: ScreeningTable) -> tuple[torch.Tensor, torch.Tensor]:
        """top_items in two passes: the catalogue in bf16, then in float32 only the bf16 pass's best
        SCREEN_CANDIDATES items. A bf16 score of h.w is within 2^-7 |h| max|w| of the float32 one (inputs and
        result rounded to 8 significant bits), so every item of the true top `limit` scores in bf16 at least the
        bf16 limit-th best minus twice that; rows whose candidates do not reach that far down are ranked whole
        in float32. The items are those of float32 ranking, up to its rounding."""
        table = self.output_item_embeddings
        screened = self.without_non_candidates(last_hidden.bfloat16() @ screening_table.table.T, rated)
        screened_scores, candidates = screened.topk(min(max(SCREEN_CANDIDATES, limit + 1), screened.shape[1]), dim=1)
        margin = 2 ** -6 * last_hidden.norm(dim=1) * screening_table.largest_norm
        screened_scores = screened_scores.float()
        covered = screened_scores[:, -1] < screened_scores[:, limit - 1] - margin
        exact = torch.bmm(table[candidates], last_hidden.unsqueeze(-1)).squeeze(-1)
        top_scores, order = exact.masked_fill(screened_scores == float("-inf"), float("-inf")).topk(limit, dim=1)
        top_items = candidates.gather(1, order)
        uncovered = (~covered).nonzero().squeeze(1)
        if len(uncovered):
            top_items[uncovered], top_scores[uncovered] = self.float32_top_items(
                last_hidden[uncovered], limit, None if rated is None else rated[uncovered])
        return top_items, top_scores


def check_id_tensor(name: str, ids) -> None:
    """A ValueError naming the argument unless ids is a (batch, length) tensor of int64 or int32, checked without
    reading its values."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        got = f"shape {tuple(ids.shape)} and dtype {ids.dtype}" if isinstance(ids, torch.Tensor) else \
            f"a {type(ids).__name__}"
        raise ValueError(f"{name} must be a (batch, length) tensor of int64 or int32 item ids, got {got}")


def gbce_alpha(negatives_per_positive: int, num_items: int) -> float:
    """The negative sampling rate alpha = k / (|I| - 1) of the paper."""
    return negatives_per_positive / (num_items - 1)


def gbce_beta(negatives_per_positive: int, num_items: int, t: float) -> float:
    """beta = alpha * (t * (1 - 1/alpha) + 1/alpha): t = 0 gives beta = 1 (BCE), t = 1 gives beta = alpha."""
    alpha = gbce_alpha(negatives_per_positive, num_items)
    return alpha * (t * (1 - 1 / alpha) + 1 / alpha)


def gamma_transform(positive_scores: torch.Tensor, beta: float) -> torch.Tensor:
    """The paper's score transform gamma(s) = log(1 / (sigmoid(s)^-beta - 1)): plain BCE on it is gBCE.

    Written as -log(expm1(x)) with x = beta * softplus(-s) = -log(sigmoid(s)^beta), stable in float32."""
    x = beta * F.softplus(-positive_scores)
    return -(x + torch.log(-torch.expm1(-x)))


def gbce_loss(positive_scores: torch.Tensor, negative_scores: torch.Tensor, beta: float) -> torch.Tensor:
    """gBCE averaged over positions: -1/(k+1) * (log sigmoid(s+)^beta + sum_i log(1 - sigmoid(s-_i))).

    Equals BCE(gamma(s+), 1) + sum_i BCE(s-_i, 0) over k + 1 terms, since -log sigmoid(gamma(s)) is exactly
    beta * softplus(-s); this form needs no clamping. positive_scores: (n,), negative_scores: (n, k)."""
    per_position = beta * F.softplus(-positive_scores) + F.softplus(negative_scores).sum(-1)
    return per_position.mean() / (negative_scores.shape[-1] + 1)


def sampled_softmax_loss(positive_scores: torch.Tensor, negative_scores: torch.Tensor,
                         negative_shift: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the positive among itself and its k sampled negatives, averaged over positions:
    log(exp(s+) + sum_i exp(s-_i + shift)) - s+. positive_scores: (n,), negative_scores: (n, k).

    negative_shift is the log-Q correction: with k uniform draws from |I| items each negative stands for |I| / k
    items, so shift = log(|I| / k) (logq_shift) makes the denominator an estimate of the full softmax's."""
    logits = torch.cat([positive_scores.unsqueeze(1), negative_scores + negative_shift], dim=1)
    return (logits.logsumexp(1) - positive_scores).mean()


def logq_shift(negatives_per_positive: int, num_items: int) -> float:
    """-log(k * Q(i)) for k uniform draws, Q(i) = 1 / |I|: the score shift of each negative under the log-Q
    correction."""
    return math.log(num_items / negatives_per_positive)


def softmax_loss(positive_scores: torch.Tensor, log_normalisers: torch.Tensor) -> torch.Tensor:
    """Full cross-entropy averaged over positions: log sum_j exp(s_j) - s+, the sum over the whole catalogue
    (log_normalisers, (n,)), so no item is left out."""
    return (log_normalisers - positive_scores).mean()
