import math

import numpy as np
import pytest
import torch

from benchmarks.paper_way import paper_way_evaluate
from dataset_utils import Sequences, offsets_from_lengths
import eval_utils
import gsasrec
from eval_utils import evaluate, ir_measures_metrics, ranking_metrics, recommend_batched
from gsasrec import GSASRec



def test_metrics_on_a_hand_made_ranking():
    recommended = np.array([[5, 1, 2, 3, 4, 6, 7, 8, 9, 10],     # hit at rank 1
                            [1, 2, 3, 5, 4, 6, 7, 8, 9, 10],     # hit at rank 4
                            [1, 2, 3, 4, 6, 7, 8, 9, 10, 5],     # hit at rank 10
                            [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]])   # miss
    metrics = ranking_metrics(recommended, np.array([5, 5, 5, 5]), ["nDCG@10", "R@1", "R@10"])
    assert metrics["nDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(11)) / 4)
    assert metrics["R@1"] == pytest.approx(0.25)
    assert metrics["R@10"] == pytest.approx(0.75)


def random_model_and_histories(num_items: int, sequence_length: int, num_heads: int, num_users: int,
                               max_length: int, seed: int) -> tuple[GSASRec, Sequences]:
    torch.manual_seed(seed)
    model = GSASRec(num_items, sequence_length, embedding_dim=16, num_heads=num_heads, num_blocks=2,
                    embedding_init_std=0.5).eval()
    rng = np.random.RandomState(seed)
    offsets = offsets_from_lengths(rng.randint(1, max_length, num_users))
    return model, Sequences(rng.randint(1, num_items + 1, offsets[-1]).astype(np.int32), offsets)


@pytest.mark.parametrize("catalogue_scores_per_batch", [None, 100])
def test_batched_recommendations_equal_one_padded_pass(catalogue_scores_per_batch, monkeypatch):
    """Also when the catalogue's scores are held for only 3 users at a time (100 scores of 32 ids)."""
    if catalogue_scores_per_batch:
        monkeypatch.setattr(eval_utils, "CATALOGUE_SCORES_PER_BATCH", catalogue_scores_per_batch)
    model, inputs = random_model_and_histories(30, 8, num_heads=1, num_users=40, max_length=15, seed=0)
    offsets = inputs.offsets
    scored_users = []
    top_items = model.top_items
    monkeypatch.setattr(model, "top_items", lambda hidden, *args: scored_users.append(len(hidden)) or
                        top_items(hidden, *args))
    items, scores = recommend_batched(model, inputs, limit=5, filter_rated=True, batch_size=7)
    assert sum(scored_users) == 40 and max(scored_users) == (3 if catalogue_scores_per_batch else 7)
    rows = np.arange(40)
    window = torch.from_numpy(inputs.windows(rows, 8, 31))
    history = torch.from_numpy(inputs.windows(rows, 14, 31))
    expected_items, expected_scores = model.get_predictions(window, 5, history)
    np.testing.assert_allclose(scores, expected_scores.numpy(), rtol=1e-4, atol=1e-4)
    assert (items == expected_items.numpy()).mean() > 0.95  # ties of nearly equal scores may swap
    for row in rows:
        assert not set(items[row]) & set(inputs.items[offsets[row]:offsets[row + 1]])


def test_evaluation_screens_large_catalogues_with_one_bf16_table(monkeypatch):
    """Where top_items ranks in two passes, recommend_batched converts the table to bf16 once for all its batches,
    and recommends what float32 ranking does."""
    model, inputs = random_model_and_histories(3000, 8, num_heads=1, num_users=60, max_length=15, seed=1)
    expected_items, expected_scores = recommend_batched(model, inputs, limit=10, batch_size=7)
    monkeypatch.setattr(gsasrec, "has_native_bf16", lambda device: True)
    monkeypatch.setattr(gsasrec, "BF16_SCREEN_MIN_ITEMS", 3000)
    conversions, screened_users = [], []
    screening_table, screened_top_items = model.screening_table, model.screened_top_items
    monkeypatch.setattr(model, "screening_table", lambda: conversions.append(1) or screening_table())
    monkeypatch.setattr(model, "screened_top_items", lambda hidden, *args: screened_users.append(len(hidden)) or
                        screened_top_items(hidden, *args))
    items, scores = recommend_batched(model, inputs, limit=10, batch_size=7)
    assert len(conversions) == 1 and sum(screened_users) == 60 and len(screened_users) > 1
    np.testing.assert_array_equal(items, expected_items)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)


@pytest.mark.parametrize("num_items, tables_used", [(30, True), (3000, False)])
def test_evaluation_looks_up_first_block_tables_for_catalogues_smaller_than_its_positions(num_items, tables_used,
                                                                                          monkeypatch):
    """60 histories of under 15 items: fewer positions than 3,000 items, more than 30."""
    model, inputs = random_model_and_histories(num_items, 8, num_heads=1, num_users=60, max_length=15, seed=4)
    passed = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda input, **kwargs: passed.append(kwargs["first_block_tables"]) or
                        forward(input, **kwargs))
    recommend_batched(model, inputs, limit=5, batch_size=7)
    assert len(passed) > 1 and all((tables is not None) == tables_used for tables in passed)
    assert len({id(tables) for tables in passed}) == 1  # made once for all batches


def test_direct_metrics_equal_ir_measures():
    rng = np.random.RandomState(3)
    recommended = np.array([rng.permutation(30)[:10] + 1 for _ in range(500)])
    targets = rng.randint(1, 31, 500)
    names = ["nDCG@10", "nDCG@5", "R@1", "R@3", "R@10"]
    direct = ranking_metrics(recommended, targets, names)
    assert direct == pytest.approx(ir_measures_metrics(recommended, targets, names), abs=1e-12)
    assert ranking_metrics(recommended, targets, ["P@10", "R@10"]) == pytest.approx(
        ir_measures_metrics(recommended, targets, ["P@10", "R@10"]))


def test_evaluation_equals_the_official_ports_way():
    """Length batching, the last-position shortcut and tensor masking give the metrics of full padded passes
    with Python loops (the benchmark's baseline)."""
    model, inputs = random_model_and_histories(60, 12, num_heads=2, num_users=300, max_length=30, seed=1)
    targets = np.random.RandomState(2).randint(1, 61, 300)
    names = ["nDCG@10", "R@1", "R@10"]
    fast = evaluate(model, inputs, targets, names, limit=10, filter_rated=True, batch_size=64)
    assert fast["R@10"] > 0
    assert fast == pytest.approx(paper_way_evaluate(model, inputs, targets, names, limit=10, batch_size=64))
