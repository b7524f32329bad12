"""The network and the paper's formulas (gsasrec.py) against plain references (tests/references.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import GSASRecExperimentConfig
from gsasrec import GSASRec, LiGRBlock, SelfAttentionBlock, gamma_transform, gbce_alpha, gbce_beta, gbce_loss
from tests.references import (brute_force_top, explicit_gbce, layer_norm, random_batch, reference_ligr_block,
                              reference_sasrec_block)
from utils import build_model

NUM_ITEMS, LENGTH = 50, 10
PAD = NUM_ITEMS + 1


def small_model(**kwargs) -> GSASRec:
    torch.manual_seed(0)
    return GSASRec(NUM_ITEMS, LENGTH, **{"embedding_dim": 16, "num_heads": 2, "num_blocks": 2,
                                         "embedding_init_std": 0.5, **kwargs}).eval()


def test_changing_an_item_changes_no_earlier_output():
    model = small_model()
    input = torch.randint(1, NUM_ITEMS + 1, (1, LENGTH))
    reference = model(input)
    for j in range(LENGTH):
        changed = input.clone()
        changed[0, j] = changed[0, j] % NUM_ITEMS + 1
        output = model(changed)
        torch.testing.assert_close(output[0, :j], reference[0, :j])
        assert not torch.allclose(output[0, j], reference[0, j])


def test_last_output_does_not_depend_on_left_padding():
    model = small_model()
    items = torch.randint(1, NUM_ITEMS + 1, (4,))
    outputs = [model(torch.cat([torch.full((padding,), PAD), items])[None])[0, -1]
               for padding in range(LENGTH - 3)]
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], rtol=1e-5, atol=1e-5)


def test_output_embeddings_are_separate_unless_reused():
    separate, reused = small_model(), small_model(reuse_item_embeddings=True)
    assert separate.output_item_embeddings is not separate.item_embedding.weight
    assert reused.output_item_embeddings is reused.item_embedding.weight
    parameters = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert parameters(separate) - parameters(reused) == (NUM_ITEMS + 2) * 16


def test_predictions_exclude_rated_padding_and_zero_and_match_brute_force():
    model = small_model()
    rng = np.random.RandomState(1)
    input = torch.from_numpy(rng.randint(1, NUM_ITEMS + 1, (20, LENGTH)))
    input[:5, :4] = PAD
    rated = torch.cat([input, torch.full((20, 3), PAD)], dim=1)
    items, scores = model.get_predictions(input, limit=NUM_ITEMS, rated=rated)
    for row in range(20):
        allowed = NUM_ITEMS - len(set(rated[row].tolist()) - {PAD})
        returned = items[row][torch.isfinite(scores[row])].tolist()
        assert len(returned) == allowed
        assert not set(returned) & (set(rated[row].tolist()) | {0, PAD})
    top_items, _ = model.get_predictions(input, limit=5, rated=rated)
    expected = brute_force_top(model, input, [set(row.tolist()) for row in rated], 5)
    assert top_items.tolist() == [[item for item, _ in row] for row in expected]
    unfiltered, _ = model.get_predictions(input, limit=NUM_ITEMS)
    assert not set(unfiltered.flatten().tolist()) & {0, PAD}


def test_scores_can_start_at_a_prior():
    torch.manual_seed(0)
    model = GSASRec(NUM_ITEMS, LENGTH, embedding_dim=16, num_heads=2, num_blocks=2, embedding_init_std=0.01,
                    initial_score=-8.0).eval()
    input = torch.randint(1, NUM_ITEMS + 1, (30, LENGTH))
    scores = model(input)[:, -1] @ model.output_item_embeddings[1:NUM_ITEMS + 1].T
    assert scores.mean().item() == pytest.approx(-8.0, abs=0.1)
    plain = small_model()
    plain_scores = plain(input)[:, -1] @ plain.output_item_embeddings[1:NUM_ITEMS + 1].T
    assert abs(plain_scores.mean().item()) < 1.0


@pytest.mark.parametrize("num_heads", [1, 2])
def test_last_position_only_equals_the_full_forward(num_heads):
    """Computing the last block for the last position only (one query, the key and value layers folded into it)
    changes no output, with padding and without (no mask)."""
    model = small_model(num_heads=num_heads)
    with torch.no_grad():
        model.blocks[-1].key.bias.normal_()
        model.blocks[-1].value.bias.normal_()
    input = torch.randint(1, NUM_ITEMS + 1, (12, LENGTH))
    unpadded = input.clone()
    for row in range(12):
        input[row, :row % LENGTH] = PAD
    for batch in (input, unpadded):
        torch.testing.assert_close(model(batch, last_position_only=True), model(batch)[:, -1:], rtol=1e-5, atol=1e-5)


def test_unpadded_inputs_take_the_causal_kernel_with_the_same_outputs():
    """Without padding, attention runs as plain causal attention; one column of padding forces the explicit mask."""
    model = small_model()
    input = torch.randint(1, NUM_ITEMS + 1, (6, LENGTH - 1))
    padded = torch.cat([torch.full((6, 1), PAD), input], dim=1)
    torch.testing.assert_close(model(input), model(padded)[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(input, last_position_only=True), model(padded, last_position_only=True),
                               rtol=1e-5, atol=1e-5)


def test_training_attention_with_dropout_equals_the_eval_kernel():
    """The training path (explicit softmax, for attention dropout) computes the same attention as SDPA."""
    model = small_model(dropout_rate=0.5, dropout=lambda rate: torch.nn.Identity())  # dropout that keeps everything
    input = torch.randint(1, NUM_ITEMS + 1, (8, LENGTH))
    for row in range(8):
        input[row, :row] = PAD
    evaluated = model(input)
    torch.testing.assert_close(model.train()(input), evaluated, rtol=1e-5, atol=1e-5)


def test_attention_dropout_without_embedding_dropout_gets_its_mask():
    """Dropout on the attention weights takes the explicit path, which needs the mask tensor: the model builds it
    for that reason, not because the embeddings also have dropout (an unpadded batch needs no mask otherwise)."""
    torch.manual_seed(0)
    model = GSASRec(20, sequence_length=8, embedding_dim=16, num_heads=2, num_blocks=1, dropout_rate=0.5).train()
    model.embedding_dropout = torch.nn.Dropout(0.0)
    hidden = model(torch.randint(1, 21, (3, 8)))
    assert hidden.shape == (3, 8, 16) and torch.isfinite(hidden).all()


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random, LayerNorm scales and biases too, so a misplaced norm or bias shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)
    return module


LEFT_PADDING = [0, 3, 7, 1]  # padded positions per row of the batch, one row without padding


@pytest.mark.parametrize("num_heads", [1, 2])
def test_the_block_equals_a_plain_sasrec_block(num_heads):
    """SelfAttentionBlock in eval mode computes the reference SASRec block on a left-padded batch."""
    torch.manual_seed(0)
    block = randomize(SelfAttentionBlock(16, num_heads, dropout_rate=0.3).double(), seed=num_heads).eval()
    length = 8
    is_item = torch.tensor([[position >= padding for position in range(length)] for padding in LEFT_PADDING])
    x = torch.randn(len(LEFT_PADDING), length, 16, dtype=torch.float64) * is_item.unsqueeze(-1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (is_item.unsqueeze(1) | torch.eye(length, dtype=torch.bool))
    bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf")).unsqueeze(1)
    with torch.no_grad():
        expected = reference_sasrec_block(block, x, is_item)
        torch.testing.assert_close(block(x, bias, is_item.unsqueeze(-1)), expected)
        torch.testing.assert_close(block(x, bias, is_item.unsqueeze(-1), last_position_only=True), expected[:, -1:])


@pytest.mark.parametrize("num_heads", [1, 2])
def test_the_model_is_embeddings_then_plain_sasrec_blocks_then_a_layer_norm(num_heads):
    """GSASRec's forward (full, last position only, with the first block's tables, with and without padding) is
    item + position embeddings with padding zeroed, the reference blocks, and the final LayerNorm."""
    num_items, length = 30, 8
    model = randomize(GSASRec(num_items, length, embedding_dim=16, num_heads=num_heads, num_blocks=2,
                              dropout_rate=0.3).double(), seed=10 + num_heads).eval()
    generator = torch.Generator().manual_seed(num_heads)
    input = torch.randint(1, num_items + 1, (len(LEFT_PADDING), length), generator=generator)
    for row, padding in enumerate(LEFT_PADDING):
        input[row, :padding] = model.padding_id
    is_item = input != model.padding_id
    with torch.no_grad():
        hidden = (model.item_embedding.weight[input] + model.position_embedding.weight) * is_item.unsqueeze(-1)
        for block in model.blocks:
            hidden = reference_sasrec_block(block, hidden, is_item)
        expected = layer_norm(hidden, model.final_norm)
        torch.testing.assert_close(model(input), expected)
        torch.testing.assert_close(model(input, last_position_only=True)[:, -1], expected[:, -1])
        unpadded = input[:1]
        torch.testing.assert_close(model(unpadded), expected[:1])


@pytest.mark.parametrize("reuse_item_embeddings", [False, True])
def test_prior_score_init_starts_every_score_near_minus_log_items(reuse_item_embeddings):
    """build_model with prior_score_init starts the mean score over the catalogue at -log(num_items) for any
    sequence, with a separate output table and with the shared one; without it the mean is near 0."""
    num_items = 500
    config = GSASRecExperimentConfig(sequence_length=10, embedding_dim=16, num_heads=2, num_blocks=2,
                                     embedding_init_std=0.05, reuse_item_embeddings=reuse_item_embeddings)
    inputs = torch.from_numpy(np.random.RandomState(0).randint(1, num_items + 1, (6, 10)))
    inputs[0, :4] = num_items + 1  # one left-padded sequence

    def initial_scores(prior: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_model(GSASRecExperimentConfig(**{**config.__dict__, "prior_score_init": prior}),
                            num_items).eval()
        with torch.no_grad():
            return model(inputs)[:, -1] @ model.output_item_embeddings[1:num_items + 1].T

    prior = -math.log(num_items)  # -6.2
    scores = initial_scores(True)
    assert scores.mean(1).tolist() == pytest.approx([prior] * 6, abs=0.05)
    assert (scores - prior).abs().max() < 1.5  # every item, not only the mean (spread: std 0.28 from the init)
    assert initial_scores(False).mean(1).abs().max() < 0.05


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
    input = random_batch(NUM_ITEMS, LENGTH)[:, 1:]
    model.eval()
    assert torch.equal(model(input), model(input))
    model.train()
    assert not torch.allclose(model(input), model(input))


@pytest.mark.parametrize("k", [1, 16, 256])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.75, 1.0])
def test_loss_equals_the_explicit_formula(k, t):
    generator = torch.Generator().manual_seed(k * 10 + int(t * 4))
    positive = torch.randn(300, generator=generator) * 3
    negative = torch.randn(300, k, generator=generator) * 3
    beta = gbce_beta(k, 3416, t)
    fast = gbce_loss(positive, negative, beta)
    assert fast.dtype == torch.float32
    assert fast.item() == pytest.approx(explicit_gbce(positive, negative, beta).item(), rel=1e-5)
    transformed = torch.cat([gamma_transform(positive.double(), beta)[:, None], negative.double()], dim=1)
    labels = torch.cat([torch.ones(300, 1), torch.zeros(300, k)], dim=1).double()
    assert fast.item() == pytest.approx(F.binary_cross_entropy_with_logits(transformed, labels).item(), rel=1e-5)


def test_beta_for_ml1m_and_its_limits():
    assert gbce_beta(256, 3416, 0.75) == pytest.approx(0.30622, abs=1e-5)
    assert gbce_beta(256, 3416, 0.0) == pytest.approx(1.0)
    assert gbce_beta(256, 3416, 1.0) == pytest.approx(gbce_alpha(256, 3416)) == pytest.approx(256 / 3415)


def test_t_zero_is_plain_bce():
    positive, negative = torch.randn(50), torch.randn(50, 8)
    scores = torch.cat([positive[:, None], negative], dim=1)
    labels = torch.cat([torch.ones(50, 1), torch.zeros(50, 8)], dim=1)
    assert gbce_loss(positive, negative, gbce_beta(8, 100, 0.0)).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(scores, labels).item(), rel=1e-6)


def test_extreme_scores_stay_finite():
    scores = torch.tensor([-50.0, -10.0, 0.0, 10.0, 50.0], requires_grad=True)
    beta = gbce_beta(256, 3416, 0.75)
    gamma = gamma_transform(scores, beta)
    loss = gbce_loss(scores, scores[:, None].expand(5, 3), beta)
    (loss + gamma.sum()).backward()
    assert torch.isfinite(gamma).all() and torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    assert gamma.detach().double() == pytest.approx(gamma_transform(scores.detach().double(), beta), rel=1e-4)
