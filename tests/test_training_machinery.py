"""The machinery behind the shipped numbers: early stopping, budgets and resuming, the learning-rate schedule, the
prior score init, which users train, what evaluation ranks and scores, and the block against a plain SASRec block."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import train_gsasrec
from config import GSASRecError, GSASRecExperimentConfig
from dataset_utils import dataset_directory, load_dataset
from eval_utils import evaluate, recommend_batched
from gsasrec import GSASRec, SelfAttentionBlock
from tests.conftest import REPO, run_script, tiny_config, write_config, write_synthetic_dataset
from train_gsasrec import Trainer, train
from utils import atomic_save, build_model, model_checkpoint, read_checkpoint, recommend_batch

CPU = torch.device("cpu")
# The shared tiny config, smaller still: these tests train many short runs.
SMALL = dict(sequence_length=10, embedding_dim=16, negs_per_pos=8, max_batches_per_epoch=2)


def small_config(**overrides) -> GSASRecExperimentConfig:
    return tiny_config(**{**SMALL, **overrides})


def write_config_file(path: Path, **overrides) -> Path:
    return write_config(path, **{**SMALL, **overrides})


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(path.name for path in run_dir.glob("gsasrec-*.pt"))


def saved_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "train_state.pt", weights_only=False)


def scripted_validation(monkeypatch, values: list[float]) -> list[int]:
    """Replaces the validation inside training with a fixed sequence of nDCG@10 values (one per epoch, in call
    order); returns a list that counts the calls."""
    calls = []

    def fake_evaluate(model, inputs, targets, metrics, *args, **kwargs):
        value = values[len(calls)]
        calls.append(1)
        return {name: value if name == "nDCG@10" else 0.0 for name in metrics}

    monkeypatch.setattr(train_gsasrec, "evaluate", fake_evaluate)
    return calls


# 1. Early stopping.

def test_early_stopping_counts_only_strict_improvements_and_keeps_one_best_checkpoint(
        synthetic_datasets_dir, tmp_path, monkeypatch, capsys):
    """Patience 3: an equal validation value is no improvement, the run ends after the 3rd epoch without one, the
    best checkpoint is the first epoch reaching the best value, and the previous best file is deleted."""
    dataset = load_dataset(dataset_directory("successor"))
    # Epochs:  0 best, 1 best, 2 equal (1 without), 3 worse (2), 4 equal (3: stop).
    calls = scripted_validation(monkeypatch, [0.10, 0.20, 0.20, 0.15, 0.20] + [0.30] * 6)
    run_dir = tmp_path / "run"
    state = train(small_config(early_stopping_patience=3), dataset, run_dir, CPU, progress=False)
    assert state.finished and state.stopped == "early stopping"
    assert (state.epoch, state.step, state.epochs_without_improvement) == (5, 10, 3)
    assert [record["step"] for record in read_log(run_dir)] == [2, 4, 6, 8, 10]
    assert [record["val_nDCG@10"] for record in read_log(run_dir)] == [0.10, 0.20, 0.20, 0.15, 0.20]
    assert state.best_metric == 0.20
    assert checkpoint_files(run_dir) == [Path(state.best_checkpoint).name]
    assert "-step:4-" in state.best_checkpoint
    best = read_checkpoint(state.best_checkpoint)
    assert (best["step"], best["epoch"], best["val_metrics"]["nDCG@10"]) == (4, 1, 0.20)
    assert saved_state(run_dir)["progress"]["stopped"] == "early stopping"
    assert "Finished (early stopping)" in capsys.readouterr().out
    assert len(calls) == 5


def test_early_stopping_ends_a_real_run_where_its_log_says(synthetic_datasets_dir, tmp_path):
    """With real validation, the run stops at the first epoch that completes `patience` epochs without a strict
    improvement, as replayed from its own log (here the rule is learnt and nDCG@10 = 1 repeats), and keeps the
    first epoch with the best value."""
    dataset = load_dataset(dataset_directory("successor"))
    patience, batches = 3, 5
    run_dir = tmp_path / "run"
    state = train(small_config(early_stopping_patience=patience, max_batches_per_epoch=batches, prior_score_init=True,
                               max_epochs=60), dataset, run_dir, CPU, progress=False)
    log = read_log(run_dir)
    best, best_step, without, stop_epoch = -math.inf, None, 0, None
    for epoch, record in enumerate(log):
        if record["val_nDCG@10"] > best:
            best, best_step, without = record["val_nDCG@10"], record["step"], 0
        else:
            without += 1
        if without >= patience:
            stop_epoch = epoch
            break
    assert stop_epoch is not None and stop_epoch > patience, "the run should learn, then early-stop"
    assert [record["val_nDCG@10"] for record in log].count(best) > 1  # ties of the best: not improvements
    assert state.finished and state.stopped == "early stopping"
    assert len(log) == stop_epoch + 1
    assert state.step == log[-1]["step"] == batches * (stop_epoch + 1)
    assert state.best_metric == best
    assert read_checkpoint(state.best_checkpoint)["step"] == best_step
    assert checkpoint_files(run_dir) == [Path(state.best_checkpoint).name]


# 2. Budgets, --fresh, finished runs, resuming with a larger patience.

def test_rerunning_a_finished_run_does_nothing_and_more_patience_lets_it_go_on(
        synthetic_datasets_dir, tmp_path, monkeypatch, capsys):
    """A run that early-stopped is not trained again by the same command; raising early_stopping_patience on
    resume continues it until the new patience runs out, with a new best checkpoint replacing the old one."""
    dataset = load_dataset(dataset_directory("successor"))
    calls = scripted_validation(monkeypatch, [0.10, 0.20, 0.20, 0.15, 0.20,  # stops here with patience 3
                                              0.30, 0.30, 0.25, 0.30, 0.30, 0.30,  # then here with 5
                                              0.99, 0.99])  # a run going on too long would improve here
    run_dir = tmp_path / "run"
    first = train(small_config(early_stopping_patience=3), dataset, run_dir, CPU, progress=False)
    assert (first.stopped, first.step) == ("early stopping", 10)
    capsys.readouterr()
    state_bytes = (run_dir / "train_state.pt").read_bytes()

    again = train(small_config(early_stopping_patience=3), dataset, run_dir, CPU, progress=False)
    assert (again.stopped, again.step, again.epoch) == ("early stopping", 10, 5)
    assert f"{run_dir} already finished (early stopping)" in capsys.readouterr().out
    assert len(calls) == 5 and len(read_log(run_dir)) == 5
    assert (run_dir / "train_state.pt").read_bytes() == state_bytes

    # Patience 5: epoch 5 improves (0.30), epochs 6-10 do not (equal or worse): stop after epoch 10, step 22.
    longer = train(small_config(early_stopping_patience=5), dataset, run_dir, CPU, progress=False)
    assert f"Resuming {run_dir} at step 10 (epoch 5)" in capsys.readouterr().out
    assert (longer.stopped, longer.step, longer.epoch) == ("early stopping", 22, 11)
    assert [record["step"] for record in read_log(run_dir)] == list(range(2, 24, 2))
    assert longer.best_metric == 0.30 and "-step:12-" in longer.best_checkpoint
    assert checkpoint_files(run_dir) == [Path(longer.best_checkpoint).name]


def test_max_training_time_stops_a_run_and_its_elapsed_time_survives_resuming(synthetic_datasets_dir, tmp_path,
                                                                             capsys):
    """A budget of 1 microsecond stops the run after its first step; the same command resumes and stops at once
    (the elapsed time is saved); a larger budget lets it go on."""
    dataset = load_dataset(dataset_directory("successor"))
    run_dir = tmp_path / "run"
    state = train(small_config(max_training_time=1e-6, max_epochs=3), dataset, run_dir, CPU, progress=False)
    assert (state.stopped, state.finished, state.step) == ("max_training_time", False, 1)
    assert "Stopped (max_training_time) at step 1; raise max_training_time in the config" in capsys.readouterr().out
    saved = saved_state(run_dir)["progress"]
    assert saved["step"] == 1 and saved["stopped"] == "max_training_time" and saved["elapsed_seconds"] >= 1e-6
    assert train(small_config(max_training_time=1e-6, max_epochs=3), dataset, run_dir, CPU,
                 progress=False).step == 1
    resumed = train(small_config(max_training_time=1e6, max_steps=5), dataset, run_dir, CPU, progress=False)
    assert (resumed.stopped, resumed.step) == ("max_steps", 5)


def test_fresh_discards_the_saved_state_log_and_checkpoints(synthetic_datasets_dir, tmp_path):
    """--fresh starts over: a run saved at step 12 is not resumed, its log and best checkpoints are deleted."""
    dataset = load_dataset(dataset_directory("successor"))
    run_dir = tmp_path / "run"
    old = train(small_config(max_steps=12), dataset, run_dir, CPU, progress=False)
    assert old.step == 12 and len(read_log(run_dir)) == 6 and "-step:" in old.best_checkpoint
    config = write_config_file(tmp_path / "config_small.py", max_steps=3)
    result = run_script("train_gsasrec.py", f"--config={config}", "--run-dir", str(run_dir), "--fresh",
                        "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "Resuming" not in result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["steps"], summary["stopped"]) == (3, "max_steps")
    assert saved_state(run_dir)["progress"]["step"] == 3
    assert [record["step"] for record in read_log(run_dir)] == [2]  # one epoch of 2 steps, then 1 step
    assert checkpoint_files(run_dir) == [Path(summary["best_checkpoint"]).name]
    assert "-step:2-" in summary["best_checkpoint"]


def test_the_trainer_updates_one_progress_in_place_and_reads_states_of_the_previous_version(synthetic_datasets_dir,
                                                                                             tmp_path):
    """Resuming and every epoch update the Trainer's Progress in place, so a reference taken before run() stays
    current; a state saved with the former 'finished' key (before Progress) still resumes."""
    dataset = load_dataset(dataset_directory("successor"))
    run_dir = tmp_path / "run"
    train(small_config(max_steps=3), dataset, run_dir, CPU, progress=False)
    saved = saved_state(run_dir)
    saved["progress"]["finished"] = None
    torch.save(saved, run_dir / "train_state.pt")
    trainer = Trainer(small_config(max_steps=5), dataset, run_dir, CPU, progress=False)
    progress = trainer.progress
    assert trainer.run() is progress
    assert (progress.step, progress.epoch, progress.stopped, progress.finished) == (5, 2, "max_steps", False)


# 3. The learning-rate schedule inside the Trainer.

def scheduled_lr(base: float, warmup: int, decay: int, step: int) -> float:
    """The learning rate of step `step` (0-based), written out from the documented schedule."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / decay)
    return base * (1 + math.cos(math.pi * progress)) / 2


def test_the_optimizer_follows_warmup_then_cosine(synthetic_datasets_dir, tmp_path):
    """The Trainer's optimiser uses learning_rate * (step + 1) / warmup_steps during the warm-up, then half a
    cosine down to 0 over lr_decay_steps, then 0; Adam's first update moves weights by the warmed-up rate."""
    dataset = load_dataset(dataset_directory("successor"))
    base, warmup, decay = 2e-3, 4, 8
    trainer = Trainer(small_config(learning_rate=base, warmup_steps=warmup, lr_decay_steps=decay), dataset,
                      tmp_path / "run", CPU, progress=False)
    rows = trainer.trainable_rows[:32]
    by_hand = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 5: (1 + math.cos(math.pi / 8)) / 2,
               6: (1 + math.sqrt(0.5)) / 2, 8: 0.5, 12: 0.0, 15: 0.0}
    for step, factor in by_hand.items():
        assert scheduled_lr(base, warmup, decay, step) == pytest.approx(base * factor, rel=1e-12, abs=1e-18)
    before = {name: value.detach().clone() for name, value in trainer.model.named_parameters()}
    for step in range(16):
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(scheduled_lr(base, warmup, decay, step),
                                                                         rel=1e-9, abs=1e-15), step
        trainer.train_step(rows)
        if step == 0:
            # Adam's first step moves each weight by lr * g / (|g| + eps): at most the step's rate.
            largest = max(float((value.detach() - before[name]).abs().max())
                          for name, value in trainer.model.named_parameters())
            assert largest == pytest.approx(base / warmup, rel=1e-3)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0


def saved_rates(saved: dict) -> list[float]:
    return [part["param_groups"][0]["lr"] for part in saved["optimizer_state"]["parts"]]


def test_the_learning_rate_continues_exactly_across_interruptions(synthetic_datasets_dir, tmp_path):
    """Stopped with max_steps in the warm-up and in the decay, then resumed: the saved rates are the schedule's
    and the final rate and weights equal an uninterrupted run's."""
    dataset = load_dataset(dataset_directory("successor"))
    base, warmup, decay = 2e-3, 3, 20
    schedule = dict(learning_rate=base, warmup_steps=warmup, lr_decay_steps=decay)
    straight = train(small_config(max_steps=14, **schedule), dataset, tmp_path / "straight", CPU, progress=False)
    for stop in (2, 7, 14):
        state = train(small_config(max_steps=stop, **schedule), dataset, tmp_path / "resumed", CPU, progress=False)
        assert state.step == stop
        saved = saved_state(tmp_path / "resumed")
        # Every part of the optimizer (the dense parameters, each item table) at the schedule's rate.
        assert saved_rates(saved) == pytest.approx([scheduled_lr(base, warmup, decay, stop)] * 3, rel=1e-9)
    assert straight.step == 14
    a, b = saved_state(tmp_path / "straight"), saved_state(tmp_path / "resumed")
    assert saved_rates(a) == saved_rates(b)
    assert a["scheduler_state"]["last_epoch"] == b["scheduler_state"]["last_epoch"] == 14
    for name, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][name]), name


@pytest.mark.parametrize("in_backward, block_rows, gathered", [(True, 7, True), (True, 8192, True), (True, 7, False),
                                                               (False, 8192, True)])
def test_the_item_tables_take_adams_updates_and_in_backward_no_gradient(synthetic_datasets_dir, monkeypatch,
                                                                       in_backward, block_rows, gathered):
    """The tables' own Adam, stepped in backward block by block of rows or after it, moves every parameter exactly
    as one Adam over the model does. In backward, the input table never holds a gradient, nor does the output table
    where its negatives are gathered; scored over the catalogue, its gradient is made whole and stepped after."""
    monkeypatch.setattr(train_gsasrec, "TABLE_STEP_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(train_gsasrec, "SMALL_K_FRACTION", 1.0 if gathered else 0.0)
    dataset = load_dataset(dataset_directory("successor"))
    config = small_config(negative_sampling="per_position")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(config, dataset.num_items))
    optimizers = (torch.optim.Adam(models[0].parameters(), lr=config.learning_rate, fused=True),
                  train_gsasrec.build_optimizer(models[1], config, in_backward=in_backward))
    tables = (models[1].item_embedding.weight, models[1].output_embedding.weight)
    table_gradients = []
    for step in range(3):
        batch = train_gsasrec.training_batch(dataset, np.arange(4 * step, 4 * step + 4), config, torch.Generator())
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same dropout masks for both
            steps = optimizer.table_steps if model is models[1] else train_gsasrec.TableSteps()
            train_gsasrec.training_loss(model, batch, config, 0.5, torch.Generator().manual_seed(step), steps
                                        ).backward()
            if model is models[1]:
                table_gradients.append([table.grad is not None for table in tables])
            optimizer.step()
    assert table_gradients == [[not in_backward, not (in_backward and gathered)]] * 3
    for name, value in models[0].state_dict().items():
        assert torch.equal(value, models[1].state_dict()[name]), name


@pytest.mark.parametrize("reuse_item_embeddings", [False, True])
def test_sparse_item_updates_are_adam_on_the_touched_rows_and_leave_the_others(synthetic_datasets_dir,
                                                                             reuse_item_embeddings):
    """sparse_item_updates: the item tables' gradients are sparse, and the optimiser moves exactly the rows a step
    touched. From equal weights, the first step equals Adam's everywhere (no moments yet); in the second, Adam
    also moves the rows only the first step touched (momentum), the lazy update leaves them, and every row the
    second step touched moves by the same amount in both (each row's moments saw the same two gradients)."""
    dataset = load_dataset(dataset_directory("successor"))
    models, optimizers = [], []
    for sparse in (False, True):
        config = small_config(sparse_item_updates=sparse, reuse_item_embeddings=reuse_item_embeddings,
                              negative_sampling="per_position")
        torch.manual_seed(0)
        models.append(build_model(config, dataset.num_items))
        optimizers.append(train_gsasrec.build_optimizer(models[-1], config))
        for group in optimizers[-1].param_groups:
            group["eps"] = 1e-20  # SparseAdam adds eps before the bias correction, Adam after: make it vanish
    assert isinstance(optimizers[1].parts[1], torch.optim.SparseAdam)
    beta = 0.5
    touched = []
    for step, rows in enumerate((np.arange(0, 4), np.arange(4, 8))):
        batch = train_gsasrec.training_batch(dataset, rows, small_config(), torch.Generator())
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same dropout masks for both
            train_gsasrec.training_loss(model, batch, small_config(), beta, torch.Generator().manual_seed(step)
                                        ).backward()
            table = model.output_item_embeddings
            assert table.grad.is_sparse == model.item_embedding.sparse
            if table.grad.is_sparse:
                touched.append(set(table.grad.coalesce().indices()[0].tolist()))
            optimizer.step()
        dense, lazy = (model.output_item_embeddings.detach() for model in models)
        if step == 0:
            before_second = [table.clone() for table in (dense, lazy)]
            for name, value in models[0].state_dict().items():
                assert torch.allclose(value, models[1].state_dict()[name], atol=1e-7), name
    first_only = sorted(touched[0] - touched[1])
    second = sorted(touched[1])
    assert first_only and second
    moved = lambda table, before: (table - before).abs().amax(1)  # noqa: E731
    assert (moved(dense, before_second[0])[first_only] > 0).all()
    assert (moved(lazy, before_second[1])[first_only] == 0).all()
    assert torch.allclose(dense[second], lazy[second], atol=1e-6)


# 4. The prior score init through build_model.

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


# 5. Which users train.

def test_users_with_fewer_than_two_training_items_are_never_in_a_batch(tmp_path, monkeypatch):
    """Users whose training sequence has 0 or 1 items (no input-target pair) are left out of every batch, and an
    epoch shows every other user exactly once."""
    directory = write_synthetic_dataset(tmp_path / "datasets" / "short", num_users=80, num_items=20, min_length=2,
                                        max_length=7, num_val_users=16, seed=1)
    train_lines = (directory / "train" / "input.txt").read_text().splitlines()
    lengths = np.array([len(line.split()) for line in train_lines])
    assert (lengths == 0).any() and (lengths == 1).any() and (lengths >= 2).any()
    expected_rows = set(np.flatnonzero(lengths >= 2).tolist())
    dataset = load_dataset(directory)
    seen = []
    original_step = Trainer.train_step

    def recording_step(self, rows):
        seen.extend(int(row) for row in rows)
        return original_step(self, rows)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    batches = math.ceil(len(expected_rows) / 8)
    config = small_config(dataset_name="short", train_batch_size=8, max_batches_per_epoch=100, max_steps=batches)
    trainer = Trainer(config, dataset, tmp_path / "run", CPU, progress=False)
    assert set(trainer.trainable_rows.tolist()) == expected_rows
    assert trainer.batches_per_epoch == batches
    state = trainer.run()
    assert state.step == batches
    assert sorted(seen) == sorted(expected_rows)
    assert math.isfinite(read_log(tmp_path / "run")[0]["train_loss"])


# 6. Evaluation: filter_rated, --split val, metric cutoffs beyond the lists.

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
        small_config(metrics=["nDCG@10", "R@20"], recommendation_limit=10)
    with pytest.raises(GSASRecError, match=r"metric R@20 needs lists of 20 items"):
        evaluate(random_model, inputs, targets, ["R@20"], 10)


# 7. recommend_batch with histories longer than the model's window.

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


# 8. The block against a plain SASRec block.

def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + 1e-8) * norm.weight + norm.bias


def reference_block(block: SelfAttentionBlock, x: torch.Tensor, is_item: torch.Tensor) -> torch.Tensor:
    """SASRec's block written out: queries from LayerNorm(x), keys and values from x, each query attending to the
    items at or before it, residual normed + attention (no output projection), LayerNorm, dense-ReLU-dense with a
    residual, padding zeroed. x: (batch, length, E); is_item: (batch, length) bool."""
    batch, length, dim = x.shape
    heads = block.num_heads
    head_dim = dim // heads
    normed = layer_norm(x, block.attention_norm)
    query = normed @ block.query.weight.T + block.query.bias
    key = x @ block.key.weight.T + block.key.bias
    value = x @ block.value.weight.T + block.value.bias
    attended = torch.zeros_like(x)
    for b in range(batch):
        for i in range(length):
            if not is_item[b, i]:
                continue
            keys = [j for j in range(i + 1) if is_item[b, j]]
            for h in range(heads):
                part = slice(h * head_dim, (h + 1) * head_dim)
                logits = key[b, keys, part] @ query[b, i, part] / math.sqrt(head_dim)
                attended[b, i, part] = torch.softmax(logits, 0) @ value[b, keys, part]
    hidden = layer_norm(normed + attended, block.feed_forward_norm)
    first, second = [module for module in block.feed_forward if isinstance(module, nn.Linear)]
    feed_forward = torch.relu(hidden @ first.weight.T + first.bias) @ second.weight.T + second.bias
    return (hidden + feed_forward) * is_item.unsqueeze(-1)


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
        expected = reference_block(block, x, is_item)
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
            hidden = reference_block(block, hidden, is_item)
        expected = layer_norm(hidden, model.final_norm)
        torch.testing.assert_close(model(input), expected)
        torch.testing.assert_close(model(input, last_position_only=True)[:, -1], expected[:, -1])
        unpadded = input[:1]
        torch.testing.assert_close(model(unpadded), expected[:1])


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_training_asks_for_huge_pages_unless_the_user_said_otherwise(preset, expected):
    """train_gsasrec.py turns on PyTorch's transparent huge pages for large CPU tensors; a value already in the
    environment stays."""
    environment = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        environment["THP_MEM_ALLOC_ENABLE"] = preset
    program = "import os, train_gsasrec; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    output = subprocess.run([sys.executable, "-c", program], cwd=REPO, env=environment, capture_output=True, text=True,
                            check=True).stdout
    assert output.strip() == expected
