"""Ranking and metrics (eval_utils.py): batched full-catalogue ranking and its shortcuts against the plain network
(GSASRec.forward, GSASRec.top_items) and brute force, metrics against ir_measures."""
import json
import math

import numpy as np
import pytest
import torch

import eval_utils
from config import GSASRecError
from dataset_utils import Sequences, dataset_directory, load_dataset, offsets_from_lengths
from eval_utils import (evaluate, first_block_tables, ir_measures_metrics, last_hidden_states, ranking_metrics,
                        recommend_batched, screened_top_items, screening_table, top1_calibration)
from gsasrec import GSASRec
from tests.conftest import run_script, small_config
from tests.references import brute_force_top
from utils import apply_overrides, atomic_save, build_model, model_checkpoint, recommend_batch

NUM_ITEMS, LENGTH = 200, 12


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


def test_direct_metrics_equal_ir_measures():
    rng = np.random.RandomState(3)
    recommended = np.array([rng.permutation(30)[:10] + 1 for _ in range(500)])
    targets = rng.randint(1, 31, 500)
    names = ["nDCG@10", "nDCG@5", "R@1", "R@3", "R@10"]
    direct = ranking_metrics(recommended, targets, names)
    assert direct == pytest.approx(ir_measures_metrics(recommended, targets, names), abs=1e-12)
    assert ranking_metrics(recommended, targets, ["P@10", "R@10"]) == pytest.approx(
        ir_measures_metrics(recommended, targets, ["P@10", "R@10"]))


def brute_force_rankings(model: GSASRec, inputs, filter_rated: bool) -> list[list[tuple[int, float]]]:
    """Per user, one unbatched forward over the last sequence_length items, every item scored, the items of the
    whole history removed when filter_rated: (item, score) pairs best first."""
    rankings = []
    table = model.output_item_embeddings
    with torch.no_grad():
        for row in range(len(inputs)):
            history = inputs.items[inputs.offsets[row]:inputs.offsets[row + 1]].tolist()
            window = history[-model.sequence_length:] or [model.padding_id]
            hidden = model(torch.tensor([window]))[0, -1]
            scores = {item: float(hidden @ table[item]) for item in range(1, model.num_items + 1)
                      if not (filter_rated and item in history)}
            rankings.append(sorted(scores.items(), key=lambda pair: -pair[1]))
    return rankings


def assert_same_ranking(items: list[int], scores: list[float], expected: list[tuple[int, float]]) -> None:
    """Same scores position by position; the items too, except where two scores tie within float32 noise."""
    expected_scores = [score for _, score in expected]
    assert scores == pytest.approx(expected_scores, abs=1e-5)
    score_of = dict(expected)
    for position, (item, (expected_item, expected_score)) in enumerate(zip(items, expected)):
        assert item == expected_item or score_of.get(item, math.inf) == pytest.approx(expected_score, abs=1e-5), \
            (position, item, expected_item)


@pytest.fixture
def random_model(synthetic_datasets_dir):
    torch.manual_seed(3)
    return build_model(small_config(embedding_init_std=0.5, num_blocks=2, num_heads=2), 40).eval()


def test_filter_rated_false_can_recommend_history_items_and_true_never_does(random_model):
    """Evaluation ranks the catalogue after the last sequence_length items; filter_rated removes every item of
    the whole history (also those older than the window), and without it history items are recommended."""
    dataset = load_dataset(dataset_directory("successor"))
    inputs, targets = dataset.test_input, dataset.test_target
    assert inputs.lengths.max() > random_model.sequence_length
    recommended = {}
    for filter_rated in (True, False):
        items, scores = recommend_batched(random_model, inputs, 10, filter_rated, batch_size=64)
        expected = brute_force_rankings(random_model, inputs, filter_rated)
        for row in range(len(inputs)):
            assert_same_ranking(items[row].tolist(), scores[row].tolist(), expected[row][:10])
        recommended[filter_rated] = items
        ranks = np.array([next((i for i, (item, _) in enumerate(ranking[:10]) if item == target), 10)
                          for ranking, target in zip(expected, targets)])
        metrics = evaluate(random_model, inputs, targets, ["nDCG@10", "R@10"], 10, filter_rated, 64)
        assert metrics["R@10"] == pytest.approx(float((ranks < 10).mean()))
        assert metrics["nDCG@10"] == pytest.approx(float(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0).mean()))
    histories = [set(inputs.items[inputs.offsets[row]:inputs.offsets[row + 1]].tolist()) for row in range(len(inputs))]
    unfiltered_hits = sum(len(set(row.tolist()) & history) for row, history in zip(recommended[False], histories))
    filtered_hits = sum(len(set(row.tolist()) & history) for row, history in zip(recommended[True], histories))
    assert unfiltered_hits > 0 and filtered_hits == 0


def test_evaluate_script_split_val_scores_the_validation_users(random_model, synthetic_datasets_dir, tmp_path):
    """evaluate_gsasrec.py --split val ranks the validation inputs against the validation targets."""
    config = small_config(embedding_init_std=0.5, num_blocks=2, num_heads=2)
    checkpoint = tmp_path / "random.pt"
    atomic_save(model_checkpoint(random_model, config), checkpoint)
    num_val_users = len((synthetic_datasets_dir / "successor" / "val" / "output.txt").read_text().splitlines())
    result = run_script("evaluate_gsasrec.py", str(checkpoint), "--split", "val", "--device", "cpu",
                        "--output", str(tmp_path / "val.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "val.json").read_text())
    assert (report["split"], report["users"]) == ("val", num_val_users) and num_val_users == 64
    assert f"({num_val_users} val users" in result.stdout
    dataset = load_dataset(dataset_directory("successor"))
    expected = evaluate(random_model, dataset.val_input, dataset.val_target, config.metrics, 10, True, 64)
    test = evaluate(random_model, dataset.test_input, dataset.test_target, config.metrics, 10, True, 64)
    assert report["metrics"] == pytest.approx(expected, abs=1e-6)
    assert report["metrics"] != pytest.approx(test, abs=1e-6)


def true_recall_at_20(model: GSASRec, inputs, targets) -> float:
    rankings = brute_force_rankings(model, inputs, filter_rated=True)
    return float(np.mean([target in [item for item, _ in ranking[:20]] for ranking, target in zip(rankings, targets)]))


def test_a_metric_beyond_the_recommendation_limit_is_an_error_in_the_config_and_in_evaluate(random_model):
    """R@20 over lists of 10 items would be scored as R@10, far from the true R@20: a config asking for it is
    refused before training, and so is eval_utils.evaluate called with it."""
    dataset = load_dataset(dataset_directory("successor"))
    inputs, targets = dataset.test_input, dataset.test_target
    r10 = evaluate(random_model, inputs, targets, ["R@10"], 10)["R@10"]
    assert true_recall_at_20(random_model, inputs, targets) > r10 + 0.05
    with pytest.raises(GSASRecError, match=r"metric R@20 needs lists of 20 items: raise recommendation_limit \(10\)"):
        apply_overrides(small_config(recommendation_limit=10), ["metrics=nDCG@10,R@20"])
    with pytest.raises(GSASRecError, match=r"metric R@20 needs lists of 20 items"):
        evaluate(random_model, inputs, targets, ["R@20"], 10)


def test_recommend_batch_reads_the_last_window_but_excludes_the_whole_history(random_model):
    """Histories longer than sequence_length are scored on their last sequence_length items (the same scores as
    that tail alone), while exclude_seen removes items seen anywhere in the history."""
    model = random_model
    length = model.sequence_length
    rng = np.random.RandomState(5)
    histories = [list(range(1, 26)),               # 25 distinct items: 1..15 lie only before the window
                 [30, 31, 32],                     # shorter than the window
                 rng.randint(1, 41, 17).tolist(),  # repeats, longer than the window
                 list(range(40, 20, -1)) + [5, 6]]
    tails = [history[-length:] for history in histories]
    with torch.no_grad():
        scores_of_tail = [model(torch.tensor([tail]))[0, -1] @ model.output_item_embeddings.T for tail in tails]
    for exclude_seen in (False, True):
        full = recommend_batch(model, histories, k=40, exclude_seen=exclude_seen)
        tail_only = recommend_batch(model, tails, k=40, exclude_seen=False)
        for history, scores, got, got_tail in zip(histories, scores_of_tail, full, tail_only):
            candidates = [item for item in range(1, 41) if not (exclude_seen and item in history)]
            expected = sorted(((item, float(scores[item])) for item in candidates), key=lambda pair: -pair[1])
            assert len(got) == len(expected)
            assert_same_ranking([item for item, _ in got], [score for _, score in got], expected)
            if not exclude_seen:
                assert [score for _, score in got] == pytest.approx([score for _, score in got_tail], abs=1e-5)
    first = recommend_batch(model, histories[:1], k=40)[0]
    assert len(first) == 15 and not {item for item, _ in first} & set(range(1, 26))
    top5 = recommend_batch(model, histories, k=5)
    full = recommend_batch(model, histories, k=40)
    assert [[item for item, _ in row] for row in top5] == [[item for item, _ in row[:5]] for row in full]


def test_softmax_calibration_uses_the_softmax_over_the_candidates():
    """With log_softmax the top-1 probability is exp(s_top) / sum of exp over the unfiltered items."""
    torch.manual_seed(0)
    model = GSASRec(NUM_ITEMS, LENGTH, 16, 2, 2, embedding_init_std=0.5).eval()
    histories = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    lengths = np.array([len(history) for history in histories])
    inputs = Sequences(np.concatenate(histories), offsets_from_lengths(lengths))
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


@pytest.mark.parametrize("block, num_blocks", [("sasrec", 2), ("sasrec", 1), ("ligr", 2)])
@pytest.mark.parametrize("num_heads", [1, 2])
def test_last_hidden_states_equal_the_plain_forward(block, num_blocks, num_heads, monkeypatch):
    """Evaluation's forward (first block's tables, attention in chunks of 3 queries, the last block folded) gives
    the plain forward's last hidden state, with padding and without, at full and cut lengths."""
    monkeypatch.setattr(eval_utils, "CPU_QUERY_CHUNK", 3)
    torch.manual_seed(num_heads)
    model = GSASRec(50, 10, embedding_dim=16, num_heads=num_heads, num_blocks=num_blocks, embedding_init_std=0.5,
                    block=block).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape) * 0.1)  # biases too, so folding them away shows
    tables = first_block_tables(model)
    assert (tables is not None) == (block == "sasrec" and num_blocks == 2)
    input = torch.randint(1, 51, (12, 10))
    unpadded = input.clone()
    for row in range(12):
        input[row, :row % 10] = model.padding_id
    for batch in (input, unpadded, unpadded[:, 3:]):
        expected = model(batch)[:, -1]
        torch.testing.assert_close(last_hidden_states(model, batch, tables), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last_hidden_states(model, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("candidates, falls_back", [(256, False), (11, True)])
def test_bf16_screening_returns_float32_rankings_items(monkeypatch, candidates, falls_back):
    """screened_top_items' two passes (large catalogues where bf16 is native) rank as float32 does, rated items
    excluded: with 256 candidates from the bf16 pass, and with 11 for a top 10, too few to cover bf16's error
    margin, where rows are ranked whole in float32 instead."""
    monkeypatch.setattr(eval_utils, "SCREEN_CANDIDATES", candidates)
    monkeypatch.setattr(eval_utils, "has_native_bf16", lambda device: True)
    monkeypatch.setattr(eval_utils, "BF16_SCREEN_MIN_ITEMS", 5000)
    torch.manual_seed(0)
    model = GSASRec(5000, 10, embedding_dim=32, num_heads=2, num_blocks=1, embedding_init_std=0.5).eval()
    hidden = torch.randn(300, 32) * 3
    rated = torch.randint(1, 5001, (300, 40))
    rated[:, 30:] = model.padding_id
    expected_items, expected_scores = model.top_items(hidden, 10, rated)
    passes = []
    screen = model.without_non_candidates
    monkeypatch.setattr(model, "without_non_candidates",
                        lambda scores, rows: passes.append((scores.dtype, len(scores))) or screen(scores, rows))
    items, scores = screened_top_items(model, hidden, 10, rated, screening_table(model))
    assert torch.equal(items, expected_items)
    torch.testing.assert_close(scores, expected_scores)
    assert passes[0] == (torch.bfloat16, 300)
    assert (len(passes) == 2 and passes[1][0] == torch.float32) == falls_back
    assert not set(items.flatten().tolist()) & {0, model.padding_id}
    assert all(not set(row) & set(rated_row) for row, rated_row in zip(items.tolist(), rated.tolist()))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_only_large_catalogues_with_native_bf16_are_screened(monkeypatch, native_bf16):
    monkeypatch.setattr(eval_utils, "has_native_bf16", lambda device: native_bf16)
    monkeypatch.setattr(eval_utils, "BF16_SCREEN_MIN_ITEMS", 50)
    screened = [screening_table(GSASRec(num_items, 10, embedding_dim=16, num_heads=2, num_blocks=1)) is not None
                for num_items in (49, 50)]
    assert screened == [False, native_bf16]


def test_evaluation_screens_large_catalogues_with_one_bf16_table(monkeypatch):
    """Where ranking takes two passes, recommend_batched converts the table to bf16 once for all its batches, and
    recommends what float32 ranking does."""
    model, inputs = random_model_and_histories(3000, 8, num_heads=1, num_users=60, max_length=15, seed=1)
    expected_items, expected_scores = recommend_batched(model, inputs, limit=10, batch_size=7)
    monkeypatch.setattr(eval_utils, "has_native_bf16", lambda device: True)
    monkeypatch.setattr(eval_utils, "BF16_SCREEN_MIN_ITEMS", 3000)
    conversions, screened_users = [], []
    make_table, screen = eval_utils.screening_table, eval_utils.screened_top_items
    monkeypatch.setattr(eval_utils, "screening_table", lambda model: conversions.append(1) or make_table(model))
    monkeypatch.setattr(eval_utils, "screened_top_items", lambda model, hidden, *args: screened_users.append(
        len(hidden)) or screen(model, hidden, *args))
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
    forward = eval_utils.last_hidden_states
    monkeypatch.setattr(eval_utils, "last_hidden_states", lambda model, input, tables: passed.append(tables) or
                        forward(model, input, tables))
    recommend_batched(model, inputs, limit=5, batch_size=7)
    assert len(passed) > 1 and all((tables is not None) == tables_used for tables in passed)
    assert len({id(tables) for tables in passed}) == 1  # made once for all batches


def test_evaluation_equals_brute_force_ranking():
    """Length batching, the evaluation shortcuts and tensor masking give the metrics of full padded passes and a
    Python sort over the catalogue."""
    model, inputs = random_model_and_histories(60, 12, num_heads=2, num_users=300, max_length=30, seed=1)
    targets = np.random.RandomState(2).randint(1, 61, 300)
    names = ["nDCG@10", "R@1", "R@10"]
    fast = evaluate(model, inputs, targets, names, limit=10, filter_rated=True, batch_size=64)
    assert fast["R@10"] > 0
    windows = torch.from_numpy(inputs.windows(np.arange(300), 12, model.padding_id).astype(np.int64))
    rated = [set(inputs.items[start:end].tolist()) for start, end in zip(inputs.offsets[:-1], inputs.offsets[1:])]
    expected = np.array([[item for item, _ in row] for row in brute_force_top(model, windows, rated, 10)])
    assert fast == pytest.approx(ranking_metrics(expected, targets, names))
