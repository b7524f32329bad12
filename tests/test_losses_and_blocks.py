"""The softmax losses and the LiGR block against plain formulas written out here."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import GSASRecError, GSASRecExperimentConfig
from dataset_utils import Sequences, offsets_from_lengths
from eval_utils import recommend_batched, top1_calibration
from gsasrec import GSASRec, LiGRBlock, has_native_bf16
import train_gsasrec
from train_gsasrec import training_loss

NUM_ITEMS, LENGTH = 200, 12


def tiny_batch(seed: int = 0) -> torch.Tensor:
    """70 left-padded windows of 2..13 items."""
    rng = np.random.RandomState(seed)
    batch = torch.full((70, LENGTH + 1), NUM_ITEMS + 1)
    for row, length in enumerate(rng.randint(2, LENGTH + 2, 70)):
        batch[row, LENGTH + 1 - length:] = torch.from_numpy(rng.randint(1, NUM_ITEMS + 1, length))
    return batch


def reference_loss(model: GSASRec, batch: torch.Tensor, config: GSASRecExperimentConfig,
                   negatives: torch.Tensor | None) -> torch.Tensor:
    """One padded pass, then per target: cross-entropy over items 1..N (softmax), or over the positive and its
    negatives, each negative's logit raised by log(N / k) with the log-Q correction (sampled_softmax)."""
    input, labels = batch[:, :-1], batch[:, 1:]
    is_target = input != model.padding_id
    hidden = model(input)[is_target]
    table = model.output_item_embeddings
    if config.loss == "softmax":
        return F.cross_entropy(hidden @ table[1:NUM_ITEMS + 1].T, labels[is_target] - 1)
    positive = (hidden * table[labels[is_target]]).sum(-1, keepdim=True)
    negative = (hidden.unsqueeze(1) * table[negatives[is_target]]).sum(-1)
    if config.logq_correction:
        negative = negative + math.log(NUM_ITEMS / config.negs_per_pos)
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.int64))


def reference_negatives(batch: torch.Tensor, config: GSASRecExperimentConfig, seed: int) -> torch.Tensor | None:
    """training_loss's draw: one (rows, k) draw per sequence, or one per target in row-major order."""
    if config.loss == "softmax":
        return None
    generator = torch.Generator().manual_seed(seed)
    rows, k = len(batch), config.negs_per_pos
    is_target = batch[:, :-1] != NUM_ITEMS + 1
    if config.negative_sampling == "per_sequence":
        return torch.randint(1, NUM_ITEMS + 1, (rows, k), generator=generator)[:, None, :].expand(rows, LENGTH, k)
    negatives = torch.ones(rows, LENGTH, k, dtype=torch.int64)
    negatives[is_target] = torch.randint(1, NUM_ITEMS + 1, (int(is_target.sum()), k), generator=generator)
    return negatives


LOSS_CASES = [
    ("softmax", False, "per_position", 1),
    ("sampled_softmax", False, "per_position", 7),   # 7 of 200 items: the blocked catalogue path
    ("sampled_softmax", True, "per_position", 7),
    ("sampled_softmax", True, "per_position", 1),    # 1 of 200: the gathering path
    ("sampled_softmax", False, "per_sequence", 16),
]


@pytest.mark.parametrize("block", ["sasrec", "ligr"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("loss, logq_correction, negative_sampling, k", LOSS_CASES)
def test_softmax_losses_equal_the_plain_formulas(loss, logq_correction, negative_sampling, k, sparse, block,
                                                 monkeypatch):
    """The engine's loss and gradients (length groups, blocked catalogue products of 32 rows) equal the plain
    cross-entropy of one padded pass; with sparse item gradients the tables' gradients are sparse."""
    monkeypatch.setattr(train_gsasrec, "CPU_GROUP_PADDING", 8)
    monkeypatch.setattr(train_gsasrec, "CATALOGUE_BLOCK_ROWS", 32)
    config = GSASRecExperimentConfig(sequence_length=LENGTH, embedding_dim=16, num_heads=2, num_blocks=2,
                                     negs_per_pos=k, loss=loss, logq_correction=logq_correction,
                                     negative_sampling=negative_sampling, block=block)
    torch.manual_seed(0)
    model = GSASRec(NUM_ITEMS, LENGTH, 16, 2, 2, embedding_init_std=0.3, sparse_item_gradients=sparse,
                    block=block).eval()
    batch = tiny_batch()
    fast = training_loss(model, batch, config, 1.0, torch.Generator().manual_seed(5))
    reference = reference_loss(model, batch, config, reference_negatives(batch, config, seed=5))
    assert fast.item() == pytest.approx(reference.item(), rel=1e-5)
    gradients = []
    for value in (fast, reference):
        model.zero_grad()
        value.backward()
        gradients.append({name: parameter.grad.to_dense() for name, parameter in model.named_parameters()})
        assert model.output_embedding.weight.grad.is_sparse == (sparse and value is fast)
    for name, gradient in gradients[1].items():
        assert (gradients[0][name] - gradient).norm() <= 1e-5 * gradient.norm() + 1e-8, name


def test_the_log_q_correction_changes_the_sampled_loss():
    """Without the correction the k sampled negatives stand for themselves, with it for N / k items each."""
    model = GSASRec(NUM_ITEMS, LENGTH, 16, 2, 2, embedding_init_std=0.3).eval()
    batch = tiny_batch()
    losses = [training_loss(model, batch, GSASRecExperimentConfig(
        sequence_length=LENGTH, embedding_dim=16, num_heads=2, num_blocks=2, negs_per_pos=7, loss="sampled_softmax",
        logq_correction=correction), 1.0, torch.Generator().manual_seed(5)).item() for correction in (False, True)]
    assert losses[1] > losses[0] + 1.0


@pytest.mark.skipif(not has_native_bf16(torch.device("cpu")), reason="no native bf16 on this CPU")
def test_bf16_catalogue_normalisers_stay_close_to_float32():
    """bf16_scores runs the softmax's catalogue products in bf16: loss and gradients within 1% of float32's."""
    model = GSASRec(NUM_ITEMS, LENGTH, 16, 2, 2, embedding_init_std=0.3).eval()
    batch = tiny_batch()
    results = []
    for bf16_scores in (False, True):
        config = GSASRecExperimentConfig(sequence_length=LENGTH, embedding_dim=16, num_heads=2, num_blocks=2,
                                         loss="softmax", bf16_scores=bf16_scores)
        model.zero_grad()
        loss = training_loss(model, batch, config, 1.0, torch.Generator().manual_seed(1))
        loss.backward()
        results.append((loss.item(), model.output_embedding.weight.grad.clone()))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert (grad16 - grad32).norm() <= 1e-2 * grad32.norm()


@pytest.mark.parametrize("fields, message", [
    ({"loss": "bpr"}, "loss must be one of"),
    ({"logq_correction": True}, "logq_correction applies to loss='sampled_softmax' only"),
    ({"block": "bert"}, "block must be one of"),
    ({"block": "ligr", "ligr_feed_forward_multiplier": 0}, "ligr_feed_forward_multiplier must be >= 1"),
])
def test_bad_loss_and_block_fields_are_named(fields, message):
    with pytest.raises(GSASRecError, match=message):
        GSASRecExperimentConfig(**fields)


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-8) * norm.weight + norm.bias


def reference_ligr_block(block: LiGRBlock, x: torch.Tensor, is_item: torch.Tensor) -> torch.Tensor:
    """LiGR written out: h = x + sigmoid(G1 x + c1) * O(Attn(LN1 x)) with each query attending to the items at
    or before it; out = h + sigmoid(G2 h + c2) * W2(silu(W LN2 h) * V LN2 h); padding zeroed."""
    batch, length, dim = x.shape
    heads = block.num_heads
    head_dim = dim // heads
    normed = layer_norm(x, block.attention_norm)
    query, key, value = (normed @ block.query_key_value.weight.T + block.query_key_value.bias).split(dim, -1)
    attended = torch.zeros_like(x)
    for b in range(batch):
        for i in range(length):
            keys = [j for j in range(i + 1) if is_item[b, j]] or [i]
            for h in range(heads):
                part = slice(h * head_dim, (h + 1) * head_dim)
                logits = key[b, keys, part] @ query[b, i, part] / math.sqrt(head_dim)
                attended[b, i, part] = torch.softmax(logits, 0) @ value[b, keys, part]
    projected = attended @ block.attention_output.weight.T + block.attention_output.bias
    gate = torch.sigmoid(x @ block.attention_gate.weight.T + block.attention_gate.bias)
    hidden = x + gate * projected
    feed_forward_input = layer_norm(hidden, block.feed_forward_norm)
    w, v = block.feed_forward.gate_and_value.weight.split(block.feed_forward.output.in_features, 0)
    swiglu = (F.silu(feed_forward_input @ w.T) * (feed_forward_input @ v.T)) @ block.feed_forward.output.weight.T
    gate = torch.sigmoid(hidden @ block.feed_forward_gate.weight.T + block.feed_forward_gate.bias)
    return (hidden + gate * swiglu) * is_item.unsqueeze(-1)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_the_ligr_block_equals_its_formula(num_heads):
    """LiGRBlock in eval mode, on a left-padded batch, full and last position only."""
    generator = torch.Generator().manual_seed(num_heads)
    block = LiGRBlock(16, num_heads, dropout_rate=0.3, feed_forward_multiplier=3).double().eval()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.5)
    length, padding = 8, [0, 3, 7, 1]
    is_item = torch.tensor([[position >= count for position in range(length)] for count in padding])
    x = torch.randn(len(padding), length, 16, dtype=torch.float64, generator=generator) * is_item.unsqueeze(-1)
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & (
        is_item.unsqueeze(1) | torch.eye(length, dtype=torch.bool))
    bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf")).unsqueeze(1)
    with torch.no_grad():
        expected = reference_ligr_block(block, x, is_item)
        torch.testing.assert_close(block(x, bias, is_item.unsqueeze(-1)), expected)
        torch.testing.assert_close(block(x, bias, is_item.unsqueeze(-1), last_position_only=True), expected[:, -1:])
        unpadded = x[:1]
        torch.testing.assert_close(block(unpadded, None, is_item[:1].unsqueeze(-1)), expected[:1])


def test_ligr_dropout_is_active_in_training_only():
    model = GSASRec(NUM_ITEMS, LENGTH, 16, 2, 2, dropout_rate=0.5, block="ligr")
    input = tiny_batch()[:, 1:]
    model.eval()
    assert torch.equal(model(input), model(input))
    model.train()
    assert not torch.allclose(model(input), model(input))


def test_softmax_calibration_uses_the_softmax_over_the_candidates():
    """With log_softmax the top-1 probability is exp(s_top) / sum of exp over the unfiltered items."""
    torch.manual_seed(0)
    model = GSASRec(NUM_ITEMS, LENGTH, 16, 2, 2, embedding_init_std=0.5).eval()
    histories = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    inputs = Sequences(np.concatenate(histories), offsets_from_lengths(np.array([len(history) for history in histories])))
    items, log_probabilities = recommend_batched(model, inputs, 5, filter_rated=True, log_softmax=True)
    _, logits = recommend_batched(model, inputs, 5, filter_rated=True)
    for row, history in enumerate(histories):
        window = torch.full((1, LENGTH), NUM_ITEMS + 1)
        window[0, -len(history):] = torch.tensor(history)
        with torch.no_grad():
            scores = model(window)[0, -1] @ model.output_item_embeddings.T
        candidates = [item for item in range(1, NUM_ITEMS + 1) if item not in history]
        expected = torch.softmax(scores[candidates], 0)[candidates.index(items[row, 0])].item()
        assert math.exp(log_probabilities[row, 0]) == pytest.approx(expected, rel=1e-4)
    targets = items[:, 0]
    softmax_report = top1_calibration(items, log_probabilities, targets, num_bins=1, log_probabilities=True)
    assert softmax_report["mean_top1_probability"] == pytest.approx(np.exp(log_probabilities[:, 0]).mean())
    sigmoid_report = top1_calibration(items, logits, targets, num_bins=1)
    assert sigmoid_report["mean_top1_probability"] == pytest.approx((1 / (1 + np.exp(-logits[:, 0]))).mean())
