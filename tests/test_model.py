import numpy as np
import pytest
import torch

import gsasrec
from gsasrec import BitFieldDropout, GSASRec

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


@pytest.mark.parametrize("candidates, falls_back", [(256, False), (11, True)])
def test_bf16_screening_returns_float32_rankings_items(monkeypatch, candidates, falls_back):
    """top_items' two passes (large catalogues where bf16 is native) rank as float32 does, rated items excluded:
    with 256 candidates from the bf16 pass, and with 11 for a top 10, too few to cover bf16's error margin, where
    rows are ranked whole in float32 instead."""
    monkeypatch.setattr(gsasrec, "SCREEN_CANDIDATES", candidates)
    torch.manual_seed(0)
    model = GSASRec(5000, LENGTH, embedding_dim=32, num_heads=2, num_blocks=1, embedding_init_std=0.5).eval()
    hidden = torch.randn(300, 32) * 3
    rated = torch.randint(1, 5001, (300, 40))
    rated[:, 30:] = model.padding_id
    expected_items, expected_scores = model.top_items(hidden, 10, rated)  # 5,000 items: float32 alone
    passes = []
    screen = model.without_non_candidates
    monkeypatch.setattr(model, "without_non_candidates",
                        lambda scores, rows: passes.append((scores.dtype, len(scores))) or screen(scores, rows))
    monkeypatch.setattr(gsasrec, "has_native_bf16", lambda device: True)
    monkeypatch.setattr(gsasrec, "BF16_SCREEN_MIN_ITEMS", 5000)
    items, scores = model.top_items(hidden, 10, rated)
    assert torch.equal(items, expected_items)
    torch.testing.assert_close(scores, expected_scores)
    assert passes[0] == (torch.bfloat16, 300)
    assert (len(passes) == 2 and passes[1][0] == torch.float32) == falls_back
    assert not set(items.flatten().tolist()) & {0, model.padding_id}
    assert all(not set(row) & set(rated_row) for row, rated_row in zip(items.tolist(), rated.tolist()))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_only_large_catalogues_with_native_bf16_are_screened(monkeypatch, native_bf16):
    monkeypatch.setattr(gsasrec, "has_native_bf16", lambda device: native_bf16)
    monkeypatch.setattr(gsasrec, "BF16_SCREEN_MIN_ITEMS", NUM_ITEMS)
    screened = []
    for num_items in (NUM_ITEMS - 1, NUM_ITEMS):
        model = GSASRec(num_items, LENGTH, embedding_dim=16, num_heads=2, num_blocks=1)
        monkeypatch.setattr(model, "screened_top_items", lambda *args, size=num_items: screened.append(size))
        model.top_items(torch.randn(3, 16), 5)
    assert screened == ([NUM_ITEMS] if native_bf16 else [])


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


@pytest.mark.parametrize("num_heads", [1, 2])
def test_first_block_tables_give_the_same_outputs(num_heads):
    """The first block's keys and values looked up from per-item and per-position tables change no output, with
    padding and without, for every position and for the last; they refuse a model that trains (dropout)."""
    model = small_model(num_heads=num_heads)
    with torch.no_grad():
        for layer in (model.blocks[0].key, model.blocks[0].value):
            layer.bias.normal_()
    tables = model.first_block_tables()
    input = torch.randint(1, NUM_ITEMS + 1, (12, LENGTH))
    unpadded = input.clone()
    for row in range(12):
        input[row, :row % LENGTH] = PAD
    for batch in (input, unpadded, unpadded[:, 3:]):
        torch.testing.assert_close(model(batch, first_block_tables=tables), model(batch), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(batch, last_position_only=True, first_block_tables=tables),
                                   model(batch, last_position_only=True), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eval"):
        model.train()(input, first_block_tables=tables)


def test_first_block_tables_exist_only_where_they_save_work():
    assert small_model(block="ligr").first_block_tables() is None
    assert small_model(num_blocks=1).first_block_tables() is None


@pytest.mark.parametrize("block", ["sasrec", "ligr"])
def test_cpu_evaluation_attends_in_query_chunks_with_the_same_outputs(block, monkeypatch):
    """Chunks of 3 queries over the keys up to each chunk's end give the one-call outputs, with padding and
    without; training attends in one call."""
    model = small_model(block=block)
    input = torch.randint(1, NUM_ITEMS + 1, (12, LENGTH))
    unpadded = input.clone()
    for row in range(12):
        input[row, :row % LENGTH] = PAD
    expected = [model(batch) for batch in (input, unpadded)]
    chunk_calls = []
    chunked = gsasrec.CausalAttention.chunked_causal_attention
    monkeypatch.setattr(gsasrec.CausalAttention, "chunked_causal_attention",
                        lambda self, *args: chunk_calls.append(1) or chunked(self, *args))
    monkeypatch.setattr(gsasrec, "CPU_QUERY_CHUNK", 3)
    for batch, reference in zip((input, unpadded), expected):
        torch.testing.assert_close(model(batch), reference, rtol=1e-5, atol=1e-5)
    assert len(chunk_calls) == 2 * len(model.blocks)
    model.train()(unpadded)
    assert len(chunk_calls) == 2 * len(model.blocks)


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


def test_attention_dropout_without_embedding_dropout_gets_its_mask():
    """Dropout on the attention weights takes the explicit path, which needs the mask tensor: the model builds it
    for that reason, not because the embeddings also have dropout (an unpadded batch needs no mask otherwise)."""
    torch.manual_seed(0)
    model = GSASRec(20, sequence_length=8, embedding_dim=16, num_heads=2, num_blocks=1, dropout_rate=0.5).train()
    model.embedding_dropout = BitFieldDropout(0.0)
    hidden = model(torch.randint(1, 21, (3, 8)))
    assert hidden.shape == (3, 8, 16) and torch.isfinite(hidden).all()
