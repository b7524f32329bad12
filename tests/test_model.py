import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gsasrec import CPU_ATTENTION_CHUNK, BitFieldDropout, GSASRec, causal_attention

NUM_ITEMS, LENGTH = 50, 10
PAD = NUM_ITEMS + 1


def small_model(**kwargs) -> GSASRec:
    torch.manual_seed(0)
    return GSASRec(NUM_ITEMS, LENGTH, embedding_dim=16, num_heads=2, num_blocks=2, embedding_init_std=0.5,
                   **kwargs).eval()


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


def brute_force_top(model: GSASRec, input: torch.Tensor, rated: torch.Tensor, limit: int) -> list[list[int]]:
    result = []
    with torch.no_grad():
        hidden = model(input)[:, -1]
        for row in range(len(input)):
            scores = {item: float(hidden[row] @ model.output_item_embeddings[item])
                      for item in range(1, NUM_ITEMS + 1) if item not in set(rated[row].tolist())}
            result.append(sorted(scores, key=scores.get, reverse=True)[:limit])
    return result


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
    assert top_items.tolist() == brute_force_top(model, input, rated, 5)
    unfiltered, _ = model.get_predictions(input, limit=NUM_ITEMS)
    assert not set(unfiltered.flatten().tolist()) & {0, PAD}


@pytest.mark.parametrize("rate,bits", [(0.5, 1), (0.25, 2), (0.75, 2), (0.0625, 4), (0.3, 16)])
def test_dropout_drops_at_the_rate_and_keeps_the_mean(rate, bits):
    dropout = BitFieldDropout(rate).train()
    assert dropout.bits == bits
    count = 400_003
    dropped = dropout(torch.ones(count)) == 0
    assert dropped.float().mean().item() == pytest.approx(rate, abs=0.005)
    assert dropout(torch.ones(count)).mean().item() == pytest.approx(1.0, abs=0.01)
    # Elements are dropped independently: neighbours, and the fields of one random byte (a byte count apart).
    random_bytes = -(-count * bits // 64) * 8
    for lag in [1] + ([random_bytes] if bits < 8 else []):
        both = (dropped[:-lag] & dropped[lag:]).float().mean().item()
        assert both == pytest.approx(rate ** 2, abs=0.005)
    assert torch.equal(dropout.eval()(torch.ones(10)), torch.ones(10))


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


def test_last_position_only_equals_the_full_forward():
    """The last block's shortcut (key and value layers folded into the single query) changes no output."""
    model = small_model()
    with torch.no_grad():
        model.blocks[-1].key.bias.normal_()
        model.blocks[-1].value.bias.normal_()
    input = torch.randint(1, NUM_ITEMS + 1, (12, LENGTH))
    for row in range(12):
        input[row, :row % LENGTH] = PAD
    full = model(input)[:, -1:]
    torch.testing.assert_close(model(input, last_position_only=True), full, rtol=1e-5, atol=1e-5)


def test_first_block_tables_give_the_same_outputs():
    """Keys and values looked up from per-item and per-position tables equal the key and value layers'."""
    model = small_model()
    with torch.no_grad():
        model.blocks[0].key.bias.normal_()
        model.blocks[0].value.bias.normal_()
    input = torch.randint(1, NUM_ITEMS + 1, (12, LENGTH))
    for row in range(12):
        input[row, :row % LENGTH] = PAD
    tables = model.first_block_key_value_tables()
    for last_position_only in (False, True):
        torch.testing.assert_close(model(input, last_position_only, first_block_tables=tables),
                                   model(input, last_position_only), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(input[:, 4:], first_block_tables=tables)[-1], model(input[:, 4:])[-1],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eval"):
        model.train()(input, first_block_tables=tables)


def test_unpadded_inputs_take_the_causal_kernel_with_the_same_outputs():
    """Without padding, attention runs as plain causal attention; one column of padding forces the explicit mask."""
    model = small_model()
    input = torch.randint(1, NUM_ITEMS + 1, (6, LENGTH - 1))
    padded = torch.cat([torch.full((6, 1), PAD), input], dim=1)
    torch.testing.assert_close(model(input), model(padded)[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(input, last_position_only=True), model(padded, last_position_only=True),
                               rtol=1e-5, atol=1e-5)


class NoDropout(torch.nn.Module):
    """Stands in for a BitFieldDropout of nonzero rate that keeps everything, so training and eval paths can be
    compared."""

    rate = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_training_attention_with_dropout_equals_the_eval_kernel():
    """The training path (explicit softmax, for attention dropout) computes the same attention as SDPA."""
    model = small_model(dropout_rate=0.5)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BitFieldDropout):
                setattr(module, name, NoDropout())
    input = torch.randint(1, NUM_ITEMS + 1, (8, LENGTH))
    for row in range(8):
        input[row, :row] = PAD
    evaluated = model(input)
    torch.testing.assert_close(model.train()(input), evaluated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [CPU_ATTENTION_CHUNK + 1, 3 * CPU_ATTENTION_CHUNK + 7])
def test_chunked_causal_attention_equals_full_attention(length):
    """Query chunks that leave out later keys give the full kernel's output, with and without a padding mask."""
    torch.manual_seed(0)
    query, key, value = torch.randn(3, 4, 2, length, 8).unbind(0)
    full = F.scaled_dot_product_attention(query, key, value, is_causal=True)
    torch.testing.assert_close(causal_attention(query, key, value, None), full, rtol=1e-5, atol=1e-5)
    padding = torch.arange(length) < torch.tensor([0, 5, length // 2, length - 1])[:, None]
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & (~padding[:, None, None, :] | torch.eye(
        length, dtype=torch.bool))
    bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    torch.testing.assert_close(causal_attention(query, key, value, bias),
                               F.scaled_dot_product_attention(query, key, value, attn_mask=bias), rtol=1e-5, atol=1e-5)


def test_attention_dropout_without_embedding_dropout_gets_its_mask():
    """Dropout on the attention weights takes the explicit path, which needs the mask tensor: the model builds it
    for that reason, not because the embeddings also have dropout (an unpadded batch needs no mask otherwise)."""
    torch.manual_seed(0)
    model = GSASRec(20, sequence_length=8, embedding_dim=16, num_heads=2, num_blocks=1, dropout_rate=0.5).train()
    model.embedding_dropout = BitFieldDropout(0.0)
    hidden = model(torch.randint(1, 21, (3, 8)))
    assert hidden.shape == (3, 8, 16) and torch.isfinite(hidden).all()
