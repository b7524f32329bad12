"""The gSASRec network and the paper's formulas (Petrov & Macdonald, RecSys '23): SASRec's causal Transformer with a
separate output item embedding, the gamma score transform and gBCE, and the softmax losses it is compared with.
Torch only. Item ids run 1..num_items, num_items + 1 is padding, 0 is never an item; sequences are left-padded and
read at their last position. Speed-only variants live in fast_training.py and eval_utils.py, tested equal to this.
"""
import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Makes a dropout module from a rate: nn.Dropout here; fast_training.BitFieldDropout draws cheaper masks on CPUs.
DropoutFactory = Callable[[float], nn.Module]


class CausalAttention(nn.Module):
    """What both blocks share: heads split from single E x E projections, and causal attention whose weights may
    get dropout."""

    def __init__(self, num_heads: int, dropout_rate: float, dropout: DropoutFactory = nn.Dropout):
        super().__init__()
        self.num_heads = num_heads
        self.dropout_rate = dropout_rate
        self.attention_dropout = dropout(dropout_rate)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, heads, length, head_dim = x.shape
        return x.transpose(1, 2).reshape(batch, length, heads * head_dim)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_bias: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d) + bias) V per head: PyTorch's fused kernel, or written out where the weights get
        dropout (a test holds the two equal). bias None means plain causal attention (causal) or none at all."""
        if not (self.training and self.dropout_rate > 0):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_bias,
                                                  is_causal=causal and attention_bias is None)
        batch, heads, length, head_dim = query.shape
        bias = attention_bias.expand(batch, heads, length, key.shape[2]).reshape(batch * heads, length, -1)
        # baddbmm scales the logits and adds the mask in one pass over (batch, heads, L, L).
        logits = torch.baddbmm(bias, query.reshape(-1, length, head_dim),
                               key.reshape(-1, key.shape[2], head_dim).transpose(1, 2), alpha=head_dim ** -0.5)
        weights = self.attention_dropout(logits.softmax(-1))
        return (weights @ value.reshape(-1, key.shape[2], head_dim)).view(batch, heads, length, head_dim)


class SelfAttentionBlock(CausalAttention):
    """One SASRec block: queries from LayerNorm(x), keys/values from x, no output projection,
    then a point-wise feed-forward with a residual."""

    def __init__(self, embedding_dim: int, num_heads: int, dropout_rate: float, dropout: DropoutFactory = nn.Dropout):
        super().__init__(num_heads, dropout_rate, dropout)
        self.attention_norm = nn.LayerNorm(embedding_dim, eps=1e-8)
        self.query = nn.Linear(embedding_dim, embedding_dim)
        self.key = nn.Linear(embedding_dim, embedding_dim)
        self.value = nn.Linear(embedding_dim, embedding_dim)
        self.feed_forward_norm = nn.LayerNorm(embedding_dim, eps=1e-8)
        self.feed_forward = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim), nn.ReLU(), dropout(dropout_rate),
            nn.Linear(embedding_dim, embedding_dim), dropout(dropout_rate))

    def forward(self, seq: torch.Tensor, attention_bias: torch.Tensor | None, is_item: torch.Tensor,
                last_position_only: bool = False) -> torch.Tensor:
        """attention_bias: GSASRec.attention_bias's additive mask, None for plain causal attention. With
        last_position_only, only the last position's output is computed (its keys still span the sequence)."""
        normed = self.attention_norm(seq[:, -1:] if last_position_only else seq)
        query = self.split_heads(self.query(normed))
        key, value = self.split_heads(self.key(seq)), self.split_heads(self.value(seq))
        if last_position_only and attention_bias is not None:
            attention_bias = attention_bias[:, :, -1:]
        attended = self.attention(query, key, value, attention_bias, causal=not last_position_only)  # last: sees all
        output = self.feed_forward_output(normed + self.merge_heads(attended))
        return output * (is_item[:, -1:] if last_position_only else is_item)

    def feed_forward_output(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feed_forward_norm(x)
        return x + self.feed_forward(x)


class SwiGLU(nn.Module):
    """Shazeer's gated feed-forward W2 (SiLU(W x) * V x), without biases; W and V are one (2H x E) product."""

    def __init__(self, embedding_dim: int, hidden_dim: int, dropout_rate: float, dropout: DropoutFactory = nn.Dropout):
        super().__init__()
        self.gate_and_value = nn.Linear(embedding_dim, 2 * hidden_dim, bias=False)
        self.dropout = dropout(dropout_rate)
        self.output = nn.Linear(hidden_dim, embedding_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.gate_and_value(x).chunk(2, dim=-1)
        return self.output(self.dropout(F.silu(gate) * value))


class LiGRBlock(CausalAttention):
    """The LiGR block (LinkedIn's "From Features to Transformers", as eSASRec uses it): pre-LayerNorm attention
    with an output projection, a SwiGLU feed-forward, and residuals whose added branch is gated by
    sigmoid(linear(x)) of the stream it joins: x + sigmoid(G1 x) * Attn(LN1 x), then h + sigmoid(G2 h) * FFN(LN2 h)."""

    def __init__(self, embedding_dim: int, num_heads: int, dropout_rate: float, feed_forward_multiplier: int,
                 dropout: DropoutFactory = nn.Dropout):
        super().__init__(num_heads, dropout_rate, dropout)
        self.attention_norm = nn.LayerNorm(embedding_dim, eps=1e-8)
        self.query_key_value = nn.Linear(embedding_dim, 3 * embedding_dim)
        self.attention_output = nn.Linear(embedding_dim, embedding_dim)
        self.attention_branch_dropout = dropout(dropout_rate)
        self.attention_gate = nn.Linear(embedding_dim, embedding_dim)
        self.feed_forward_norm = nn.LayerNorm(embedding_dim, eps=1e-8)
        self.feed_forward = SwiGLU(embedding_dim, feed_forward_multiplier * embedding_dim, dropout_rate, dropout)
        self.feed_forward_branch_dropout = dropout(dropout_rate)
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
    """SASRec's architecture (block="ligr": LiGR blocks); scores are dot products of the last hidden state with an
    output item table, separate from the input one unless reuse_item_embeddings (vanilla SASRec). sparse_item_gradients
    for torch.optim.SparseAdam on large catalogues; dropout makes the dropout modules (nn.Dropout by default)."""

    def __init__(self, num_items: int, sequence_length: int = 200, embedding_dim: int = 256, num_heads: int = 4,
                 num_blocks: int = 3, dropout_rate: float = 0.0, reuse_item_embeddings: bool = False,
                 embedding_init_std: float | None = None, initial_score: float | None = None,
                 sparse_item_gradients: bool = False, block: str = "sasrec", feed_forward_multiplier: int = 4,
                 dropout: DropoutFactory = nn.Dropout):
        super().__init__()
        sizes = dict(num_items=num_items, sequence_length=sequence_length, embedding_dim=embedding_dim,
                     num_heads=num_heads, num_blocks=num_blocks, feed_forward_multiplier=feed_forward_multiplier)
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, numbers.Integral):
                raise TypeError(f"{name} must be a whole number, got {size!r}")
            if size < 1:
                raise ValueError(f"{name} must be at least 1, got {size}")
        if embedding_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide embedding_dim ({embedding_dim})")
        if not (isinstance(dropout_rate, (int, float)) and 0 <= dropout_rate < 1):
            raise ValueError(f"dropout_rate must be a number in [0, 1), got {dropout_rate!r}")
        if embedding_init_std is not None and not (isinstance(embedding_init_std, (int, float))
                                                   and 0 < embedding_init_std < math.inf):
            raise ValueError(f"embedding_init_std must be a number > 0 or None, got {embedding_init_std!r}")
        blocks = {"sasrec": lambda: SelfAttentionBlock(embedding_dim, num_heads, dropout_rate, dropout),
                  "ligr": lambda: LiGRBlock(embedding_dim, num_heads, dropout_rate, feed_forward_multiplier, dropout)}
        if block not in blocks:
            raise ValueError(f"block must be one of {tuple(blocks)}, got {block!r}")
        self.num_items = num_items
        self.padding_id = num_items + 1
        self.sequence_length = sequence_length
        self.embedding_dim = embedding_dim
        self.item_embedding = nn.Embedding(num_items + 2, embedding_dim, sparse=sparse_item_gradients)
        self.position_embedding = nn.Embedding(sequence_length, embedding_dim)
        self.embedding_dropout = dropout(dropout_rate)
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
        """Initialises every item's score near `score`, as a classifier's bias starts at the prior log-odds: with the
        final LayerNorm's bias all ones (its output less the bias has zero mean), score / E added to every output
        embedding adds `score` to every score. Near log(1 / num_items) the sampled negatives start near their
        optimum; from zero, pushing them down first collapses the model to popularity."""
        self.final_norm.bias.fill_(1.0)
        self.output_item_embeddings.add_(score / self.embedding_dim)

    @property
    def output_item_embeddings(self) -> torch.Tensor:
        """The (num_items + 2, E) table scores are dot products with."""
        table = self.item_embedding if self.reuse_item_embeddings else self.output_embedding
        return table.weight

    def forward(self, input: torch.Tensor, last_position_only: bool = False) -> torch.Tensor:
        """(batch, length) left-padded item ids -> (batch, length, E) hidden states ((batch, 1, E) with
        last_position_only, which skips the last block's work on every other position)."""
        check_item_ids("input", input)  # kind and shape only: forward runs on every training step
        return self.encode(self.item_embedding(input), input != self.padding_id, last_position_only)

    def encode(self, item_vectors: torch.Tensor, is_item: torch.Tensor, last_position_only: bool = False
               ) -> torch.Tensor:
        """forward from the input's item vectors (batch, length, E) and non-padding mask (batch, length). A length
        under sequence_length is the right end of a full window: cutting columns of pure padding changes nothing."""
        length = is_item.shape[1]
        if length > self.sequence_length:
            raise ValueError(f"input length {length} exceeds sequence_length {self.sequence_length}")
        is_item = is_item.unsqueeze(-1)
        positions = torch.arange(self.sequence_length - length, self.sequence_length, device=is_item.device)
        seq = self.embedding_dropout(item_vectors + self.position_embedding(positions)) * is_item
        attention_bias = self.attention_bias(is_item)
        for index, block in enumerate(self.blocks):
            seq = block(seq, attention_bias, is_item, last_position_only and index == len(self.blocks) - 1)
        return self.final_norm(seq)

    def attention_bias(self, is_item: torch.Tensor) -> torch.Tensor | None:
        """The (batch, 1, L, L) additive mask: causal, keys restricted to real items, each position seeing itself so
        no row is all-masked. None for plain causal attention (no padding, no attention dropout to write out)."""
        if bool(is_item.all()) and not (self.training and self.blocks[0].dropout_rate > 0):
            return None
        length = is_item.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=is_item.device).tril()
        allowed = causal & (is_item.transpose(1, 2) | torch.eye(length, dtype=torch.bool, device=is_item.device))
        bias = torch.zeros(allowed.shape, dtype=self.position_embedding.weight.dtype, device=allowed.device)
        return bias.masked_fill_(~allowed, float("-inf")).unsqueeze(1)

    @torch.no_grad()
    def get_predictions(self, input: torch.Tensor, limit: int, rated: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-`limit` (item ids, scores) per sequence over the full catalogue.

        Id 0, the padding id and, if given, the `rated` ids ((batch, n) tensor, padding_id where unused)
        are never returned."""
        check_item_ids("input", input, self.num_items)
        if rated is not None:
            check_item_ids("rated", rated, self.num_items, rows=len(input))
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= self.num_items:
            raise ValueError(f"limit must be a whole number in 1..{self.num_items} (the catalogue), got {limit!r}")
        return self.top_items(self.forward(input, last_position_only=True)[:, -1, :], limit, rated)

    def top_items(self, last_hidden: torch.Tensor, limit: int, rated: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """get_predictions from the (batch, E) last hidden states: the catalogue scored, non-candidates excluded."""
        scores = self.without_non_candidates(last_hidden @ self.output_item_embeddings.T, rated)
        top_scores, top_items = scores.topk(limit, dim=1)
        return top_items, top_scores

    def without_non_candidates(self, scores: torch.Tensor, rated: torch.Tensor | None) -> torch.Tensor:
        """Catalogue scores (batch, num_items + 2) with id 0, the padding id and the `rated` ids set to -inf, in
        place."""
        scores[:, [0, self.padding_id]] = float("-inf")
        if rated is not None:
            # index_put_ rather than scatter_, which copies a bf16 table whole.
            rows = torch.arange(len(scores), device=scores.device).unsqueeze(1).expand(rated.shape)
            scores.index_put_((rows, rated.to(torch.int64)), torch.tensor(float("-inf"), dtype=scores.dtype,
                                                                           device=scores.device))
        return scores


def check_item_ids(name: str, ids: torch.Tensor, num_items: int | None = None, rows: int | None = None) -> None:
    """A ValueError naming the argument unless ids is a (batch, length) integer tensor (of `rows` rows), and, where
    num_items is given, its ids are items 1..num_items or the padding id: not an IndexError deep inside."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        got = f"shape {tuple(ids.shape)} and dtype {ids.dtype}" if isinstance(ids, torch.Tensor) else \
            f"a {type(ids).__name__}"
        raise ValueError(f"{name} must be a (batch, length) tensor of int64 or int32 item ids, got {got}")
    if rows is not None and len(ids) != rows:
        raise ValueError(f"{name} must have a row for each of the {rows} input rows, got {len(ids)}")
    if num_items is not None and ids.numel() and not bool(((ids >= 1) & (ids <= num_items + 1)).all()):
        raise ValueError(f"{name} holds ids outside 1..{num_items} (the items) and {num_items + 1} (padding)")


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
    log(exp(s+) + sum_i exp(s-_i + shift)) - s+; positive_scores (n,), negative_scores (n, k). The log-Q correction
    shift = log(|I| / k) (logq_shift) makes each negative stand for |I| / k items, as k uniform draws do."""
    logits = torch.cat([positive_scores.unsqueeze(1), negative_scores + negative_shift], dim=1)
    return (logits.logsumexp(1) - positive_scores).mean()


def logq_shift(negatives_per_positive: int, num_items: int) -> float:
    """-log(k * Q(i)) for k uniform draws, Q(i) = 1 / |I|: each negative's score shift under the log-Q correction."""
    return math.log(num_items / negatives_per_positive)


def softmax_loss(positive_scores: torch.Tensor, log_normalisers: torch.Tensor) -> torch.Tensor:
    """Full cross-entropy averaged over positions: log sum_j exp(s_j) - s+, the sum over the whole catalogue
    (log_normalisers, (n,)), so no item is left out."""
    return (log_normalisers - positive_scores).mean()
