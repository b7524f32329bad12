"""The training run (train_gsasrec.py): the paper's procedure end to end under both engines, early stopping and
selection, budgets, schedules, resuming, and the command line."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import fast_training
import train_gsasrec
from config import GSASRecError, GSASRecExperimentConfig
from dataset_utils import dataset_directory, ensure_dataset, load_dataset, training_batch
from eval_utils import evaluate, recommend_batched
from gsasrec import GSASRec, gbce_beta
from tests.conftest import (REPO, SMALL, run_main, run_script, small_config, tiny_config, write_config,
                            write_synthetic_dataset)
from tests.references import formula_loss, random_batch
from train_gsasrec import Trainer, reference_loss, sample_negatives, train
from utils import build_model, load_config, load_model, model_from_checkpoint, read_checkpoint


CPU = torch.device("cpu")


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


def test_training_learns_the_rule_and_the_checkpoint_reloads(synthetic_datasets_dir, tmp_path, capsys):
    dataset = load_dataset(dataset_directory("successor"))
    state = train(tiny_config(max_steps=300), dataset, tmp_path / "run", torch.device("cpu"), progress=False)
    assert state.step == 300 and state.stopped == "max_steps"
    assert "Stopped (max_steps) at step 300; raise max_steps in the config and rerun" in capsys.readouterr().out
    model, config = load_model(state.best_checkpoint, device="cpu")
    test = evaluate(model, dataset.test_input, dataset.test_target, config.metrics, 10)
    assert test["nDCG@10"] > 0.9
    checkpoint = read_checkpoint(state.best_checkpoint)
    assert evaluate(model, dataset.val_input, dataset.val_target, config.metrics, 10) == checkpoint["val_metrics"]
    with pytest.raises(GSASRecError, match="embedding_dim=32 in the checkpoint, 64 in the config"):
        model_from_checkpoint(checkpoint, tiny_config(embedding_dim=64))
    with pytest.raises(GSASRecError, match="trained on 40 items but the dataset has 41"):
        model_from_checkpoint(checkpoint, num_items=41)
    latest, _ = load_model(str(tmp_path / "run" / "train_state.pt"), device="cpu")
    state_weights = read_checkpoint(str(tmp_path / "run" / "train_state.pt"))["model_state"]
    assert all(torch.equal(value, state_weights[name]) for name, value in latest.state_dict().items())
    assert evaluate(latest, dataset.test_input, dataset.test_target, config.metrics, 10)["nDCG@10"] > 0.9


@pytest.mark.parametrize("sampling", [
    dict(negative_sampling="per_sequence"), dict(negative_sampling="per_position"),
    dict(training_window="random"), dict(training_window="random", user_sampling="per_interaction"),
    dict(weight_averaging_decay=0.9),
    # The lazy table updates keep two optimizers' states, and the cosine must reach both after resuming.
    dict(negative_sampling="per_position", sparse_item_updates=True, lr_decay_steps=35)],
    ids=["per_sequence", "per_position", "random_windows", "per_interaction", "weight_averaging",
         "sparse_item_updates"])
def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(synthetic_datasets_dir, tmp_path, sampling):
    dataset = load_dataset(dataset_directory("successor"))
    straight = train(tiny_config(max_steps=35, **sampling), dataset, tmp_path / "a", torch.device("cpu"),
                     progress=False)
    first = train(tiny_config(max_steps=17, **sampling), dataset, tmp_path / "b", torch.device("cpu"),
                  progress=False)
    assert first.step == 17 and first.batch_in_epoch == 7
    resumed = train(tiny_config(max_steps=35, **sampling), dataset, tmp_path / "b", torch.device("cpu"),
                    progress=False)
    assert resumed.step == straight.step == 35
    weights = lambda run: torch.load(tmp_path / run / "train_state.pt", weights_only=False)["model_state"]  # noqa: E731
    for name, value in weights("a").items():
        assert torch.equal(value, weights("b")[name]), name
    logs = [[{k: v for k, v in json.loads(line).items() if k != "time_s"}
             for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("a", "b")]
    assert logs[0] == logs[1] and len(logs[0]) == 3


def test_the_scoring_path_a_run_times_is_said_recorded_and_kept_on_resuming(synthetic_datasets_dir, tmp_path, capsys):
    """per_position_scoring="auto": the trial's choice and timings are printed once and saved in the training record;
    a resumed run keeps that path (set here to the one not chosen, to see it kept) instead of timing again."""
    dataset = load_dataset(dataset_directory("successor"))
    config = lambda steps: tiny_config(max_steps=steps, negative_sampling="per_position",  # noqa: E731
                                       per_position_scoring="auto")
    train(config(15), dataset, tmp_path / "run", torch.device("cpu"), progress=False)
    state_path = tmp_path / "run" / "train_state.pt"
    made = read_checkpoint(str(state_path))["training"]
    assert made["per_position_scoring"] in ("gathered", "catalogue")
    assert set(made["scoring_trial_us_per_target"]) == {"gathered", "catalogue"}
    assert capsys.readouterr().out.count(f"Per-position negatives are scored {made['per_position_scoring']} "
                                         "(fastest step per target: ") == 1
    other = "catalogue" if made["per_position_scoring"] == "gathered" else "gathered"
    state = torch.load(state_path, weights_only=False)
    state["training"]["per_position_scoring"] = other
    torch.save(state, state_path)
    trainer = Trainer(config(17), dataset, tmp_path / "run", torch.device("cpu"), progress=False)
    trainer.run()
    assert trainer.scoring.path == other and trainer.scoring.seconds == {"gathered": [], "catalogue": []}
    assert read_checkpoint(str(state_path))["training"]["per_position_scoring"] == other


def test_weight_averaging_validates_and_ships_the_moving_average(synthetic_datasets_dir, tmp_path):
    dataset = load_dataset(dataset_directory("successor"))
    saved = lambda: read_checkpoint(str(tmp_path / "run" / "train_state.pt"))  # noqa: E731
    run = lambda steps: train(tiny_config(max_steps=steps, weight_averaging_decay=0.9), dataset,  # noqa: E731
                              tmp_path / "run", torch.device("cpu"), progress=False)
    run(1)
    first = saved()
    raw_1 = first["training_model_state"]
    assert all(torch.equal(value, raw_1[name]) for name, value in first["model_state"].items())
    run(2)
    second = saved()
    raw_2 = second["training_model_state"]
    for name, value in second["model_state"].items():
        assert torch.allclose(value, 0.9 * raw_1[name] + 0.1 * raw_2[name], atol=1e-6), name
    state = run(10)
    final = saved()
    averaged, raw = final["model_state"], final["training_model_state"]
    best = read_checkpoint(state.best_checkpoint)
    assert all(torch.equal(value, best["model_state"][name]) for name, value in averaged.items())
    assert not torch.equal(averaged["item_embedding.weight"], raw["item_embedding.weight"])
    model, config = load_model(state.best_checkpoint, device="cpu")
    assert evaluate(model, dataset.val_input, dataset.val_target, config.metrics, 10) == best["val_metrics"]


def test_a_run_saved_on_another_kind_of_device_resumes(synthetic_datasets_dir, tmp_path, capsys):
    """A CUDA generator's 16-byte state cannot seed a CPU generator: the streams restart from the seed instead."""
    dataset = load_dataset(dataset_directory("successor"))
    train(tiny_config(max_steps=3), dataset, tmp_path / "run", torch.device("cpu"), progress=False)
    state_path = tmp_path / "run" / "train_state.pt"
    state = torch.load(state_path, weights_only=False)
    state["rng_states"][0]["generator"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, state_path)
    resumed = train(tiny_config(max_steps=6), dataset, tmp_path / "run", torch.device("cpu"), progress=False)
    assert resumed.step == 6
    assert "saved on another kind of device than cpu: random streams restart" in capsys.readouterr().out


def test_a_resumed_run_takes_this_devices_adam_kernel(synthetic_datasets_dir, tmp_path):
    """A run saved where Adam had no fused kernel (or by an older version) resumes with the fused one here."""
    dataset = load_dataset(dataset_directory("successor"))
    train(tiny_config(max_steps=3), dataset, tmp_path / "run", torch.device("cpu"), progress=False)
    state_path = tmp_path / "run" / "train_state.pt"
    state = torch.load(state_path, weights_only=False)
    fused = lambda state: [part["param_groups"][0]["fused"] for part in state["optimizer_state"]["parts"]]  # noqa
    assert fused(state) == [True] * 3  # the dense parameters and each item table
    for part in state["optimizer_state"]["parts"]:
        part["param_groups"][0]["fused"] = False
    torch.save(state, state_path)
    train(tiny_config(max_steps=6), dataset, tmp_path / "run", torch.device("cpu"), progress=False)
    assert fused(torch.load(state_path, weights_only=False)) == [True] * 3


def test_a_training_state_with_one_adam_for_every_parameter_is_refused_in_one_line(synthetic_datasets_dir, tmp_path):
    """Earlier versions saved a single Adam's state; this one keeps the item tables' Adam apart."""
    dataset = load_dataset(dataset_directory("successor"))
    train(tiny_config(max_steps=3), dataset, tmp_path / "run", torch.device("cpu"), progress=False)
    state_path = tmp_path / "run" / "train_state.pt"
    state = torch.load(state_path, weights_only=False)
    state["optimizer_state"] = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))]).state_dict()
    torch.save(state, state_path)
    with pytest.raises(GSASRecError, match="earlier version of this code.*--fresh"):
        train(tiny_config(max_steps=6), dataset, tmp_path / "run", torch.device("cpu"), progress=False)


def test_a_different_config_does_not_resume_silently(synthetic_datasets_dir, tmp_path):
    dataset = load_dataset(dataset_directory("successor"))
    train(tiny_config(max_steps=3), dataset, tmp_path / "run", torch.device("cpu"), progress=False)
    with pytest.raises(GSASRecError, match="different config"):
        train(tiny_config(max_steps=6, gbce_t=0.5), dataset, tmp_path / "run", torch.device("cpu"), progress=False)


def test_command_line_train_sigterm_resume_and_evaluate(synthetic_datasets_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config_tiny.py", max_steps=100000)
    process = subprocess.Popen([sys.executable, "train_gsasrec.py", f"--config={config}", "--run-dir", str(run_dir),
                                "--no-progress"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run_dir / "log.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "Stopped (interrupted)" in output
    step = torch.load(run_dir / "train_state.pt", weights_only=False)["progress"]["step"]
    assert step >= 10

    write_config(config, max_steps=step + 15)
    resumed = run_script("train_gsasrec.py", f"--config={config}", "--run-dir", str(run_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {run_dir} at step {step}" in resumed.stdout
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["steps"] == step + 15 and summary["stopped"] == "max_steps"

    checkpoint = summary["best_checkpoint"]
    assert "gsasrec-successor-step:" in checkpoint and "-negs:16-emb:32-dropout:0.1-metric:" in checkpoint
    by_flag = run_script("evaluate_gsasrec.py", f"--checkpoint={checkpoint}", "--output", str(tmp_path / "a.json"))
    positional = run_script("evaluate_gsasrec.py", checkpoint, f"--config={config}",
                            "--output", str(tmp_path / "b.json"))
    assert by_flag.returncode == 0 and positional.returncode == 0, by_flag.stderr + positional.stderr
    assert "nDCG@10" in by_flag.stdout
    metrics = [json.loads((tmp_path / name).read_text())["metrics"] for name in ("a.json", "b.json")]
    assert metrics[0] == metrics[1] and set(metrics[0]) == {"nDCG@10", "R@1", "R@10"}

    missing = run_script("evaluate_gsasrec.py", str(tmp_path / "absent.pt"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "checkpoint not found" in missing.stderr
    mismatch = run_script("evaluate_gsasrec.py", checkpoint,
                          f"--config={write_config(tmp_path / 'config_big.py', embedding_dim=64)}")
    assert mismatch.returncode == 2 and "does not fit the config" in mismatch.stderr


def test_command_line_seed_overrides_the_config_and_is_saved(synthetic_datasets_dir, tmp_path, monkeypatch):
    """--seed 42 reproduces the config's seed 42; --seed 7 trains differently, in its own default run folder."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "config_tiny.py", seed=42, max_steps=3)
    run_dirs = {"config": tmp_path / "config", "seed42": tmp_path / "seed42",
                "seed7": tmp_path / "models" / "config_tiny-seed7"}
    for name, extra_args in (("config", ["--run-dir", str(run_dirs["config"])]),
                             ("seed42", ["--run-dir", str(run_dirs["seed42"]), "--seed", "42"]),
                             ("seed7", ["--seed", "7"])):
        status, _, stderr = run_main(train_gsasrec, f"--config={config}", *extra_args, "--no-progress")
        assert status == 0, stderr
    saved = {name: torch.load(run_dir / "train_state.pt", weights_only=True) for name, run_dir in run_dirs.items()}
    assert [saved[name]["config"]["seed"] for name in ("config", "seed42", "seed7")] == [42, 42, 7]
    embeddings = {name: state["model_state"]["item_embedding.weight"] for name, state in saved.items()}
    assert torch.equal(embeddings["config"], embeddings["seed42"])
    assert not torch.equal(embeddings["config"], embeddings["seed7"])
    status, _, stderr = run_main(train_gsasrec, f"--config={config}", "--run-dir", str(run_dirs["seed7"]),
                                 "--seed", "8", "--no-progress")
    assert status == 2 and "different config" in stderr


def test_set_overrides_reach_the_checkpoint_and_the_run_folder_name(synthetic_datasets_dir, tmp_path, monkeypatch):
    """--set gbce_t=1.0 --set negs_per_pos=4 trains that config, saves it, and names the default run folder after it;
    a bad override is one line on stderr with exit status 2 and writes nothing."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "config_tiny.py", max_steps=3)
    status, _, stderr = run_main(train_gsasrec, f"--config={config}", "--set", "gbce_t=1.0", "--set",
                                 "negs_per_pos=4", "--no-progress")
    assert status == 0, stderr
    run_dir = tmp_path / "models" / "config_tiny-gbce_t=1.0-negs_per_pos=4"
    saved = read_checkpoint(str(run_dir / "train_state.pt"))
    assert (saved["config"]["gbce_t"], saved["config"]["negs_per_pos"]) == (1.0, 4)
    assert saved["training"]["steps"] == 3 and saved["training"]["seconds"] > 0
    assert {"device", "threads", "torch", "native_bf16"} <= set(saved["training"])
    status, _, stderr = run_main(train_gsasrec, f"--config={config}", "--set", "negs_per_position=4", "--no-progress")
    assert status == 2
    assert stderr.strip().splitlines() == ["error: --set negs_per_position: no such config field "
                                           "(did you mean negs_per_pos?)"]
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == [run_dir.name]


def test_lists_longer_than_the_catalogue_are_cut_to_it(synthetic_datasets_dir):
    """config_ml1m.py's lists of 100 on a 40-item dataset: every item ranked once, nDCG@100 = nDCG@40."""
    dataset = load_dataset(dataset_directory("successor"))
    torch.manual_seed(0)
    model = build_model(tiny_config(), dataset.num_items).eval()
    recommended, _ = recommend_batched(model, dataset.test_input, 100, filter_rated=False)
    assert recommended.shape == (len(dataset.test_target), 40)
    assert all(sorted(row) == list(range(1, 41)) for row in recommended.tolist())
    long_lists = evaluate(model, dataset.test_input, dataset.test_target, ["nDCG@100"], 100, filter_rated=False)
    catalogue = evaluate(model, dataset.test_input, dataset.test_target, ["nDCG@40"], 40, filter_rated=False)
    assert long_lists["nDCG@100"] == pytest.approx(catalogue["nDCG@40"]) and long_lists["nDCG@100"] > 0


def test_selection_keeps_only_checkpoints_from_selection_start_step(synthetic_datasets_dir, tmp_path):
    """Every epoch is validated and logged, but the best checkpoint is the best epoch at or after the start, and
    epochs before it do not count towards early stopping."""
    dataset = load_dataset(dataset_directory("successor"))
    state = train(tiny_config(max_steps=100, selection_start_step=60, early_stopping_patience=2), dataset,
                  tmp_path / "run", torch.device("cpu"), progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log][:3] == [10, 20, 30]
    eligible = [record for record in log if record["step"] >= 60]
    best = max(eligible, key=lambda record: record["val_nDCG@10"])
    assert read_checkpoint(state.best_checkpoint)["step"] == best["step"]
    assert state.best_metric == best["val_nDCG@10"]
    assert [path.name for path in (tmp_path / "run").glob("gsasrec-*.pt")] == [Path(state.best_checkpoint).name]


def test_a_run_at_the_end_of_its_schedule_says_it_finished(synthetic_datasets_dir, tmp_path, capsys):
    dataset = load_dataset(dataset_directory("successor"))
    state = train(tiny_config(max_steps=30, lr_decay_steps=30), dataset, tmp_path / "run", torch.device("cpu"),
                  progress=False)
    assert state.stopped == "max_steps"
    assert f"Finished the learning-rate schedule at step 30; best checkpoint: {state.best_checkpoint}" in \
        capsys.readouterr().out


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


# The engines and the reference loss.

@pytest.mark.parametrize("loss, negative_sampling, logq_correction", [
    ("gbce", "per_position", False), ("gbce", "per_sequence", False), ("softmax", "per_position", False),
    ("sampled_softmax", "per_position", True), ("sampled_softmax", "per_sequence", False)])
def test_the_reference_loss_is_the_papers_formula(loss, negative_sampling, logq_correction):
    """reference_loss (every item scored, the targets' scores picked out) equals the loss written out from gathered
    embeddings, gBCE term by term in float64."""
    config = GSASRecExperimentConfig(sequence_length=12, embedding_dim=16, num_heads=2, num_blocks=2, negs_per_pos=9,
                                     gbce_t=0.75, loss=loss, negative_sampling=negative_sampling,
                                     logq_correction=logq_correction)
    torch.manual_seed(0)
    model = GSASRec(100, 12, 16, 2, 2, embedding_init_std=0.3).eval()
    batch = random_batch(100, 12)
    negatives = sample_negatives(batch, config, 100, torch.Generator().manual_seed(3))
    beta = gbce_beta(9, 100, 0.75)
    assert reference_loss(model, batch, negatives, config, beta).item() == pytest.approx(
        formula_loss(model, batch, negatives, config, beta).item(), rel=1e-6)


def test_negatives_are_drawn_per_target_or_per_sequence_from_the_catalogue():
    """k uniform ids in 1..N: one draw per non-padded position (the paper's), one per row, none for the softmax."""
    batch = random_batch(30, 12)
    targets = int((batch[:, :-1] != 31).sum())
    config = GSASRecExperimentConfig(negs_per_pos=5)
    negatives = sample_negatives(batch, config, 30, torch.Generator().manual_seed(0))
    assert negatives.shape == (targets, 5) and negatives.min() >= 1 and negatives.max() <= 30
    assert len(negatives.unique()) == 30  # every item drawn
    assert sample_negatives(batch, replace(config, negative_sampling="per_sequence"), 30,
                            torch.Generator()).shape == (70, 5)
    assert sample_negatives(batch, replace(config, loss="softmax"), 30, torch.Generator()) is None


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_both_engines_train_the_rule_and_resume_to_the_same_weights(synthetic_datasets_dir, tmp_path, engine):
    """Each engine learns the successor rule, and a run it stops and resumes ends with the weights of one that ran
    through; the reference engine trains with nn.Dropout and one plain Adam."""
    dataset = load_dataset(dataset_directory("successor"))
    config = tiny_config(engine=engine, max_steps=40)
    through = Trainer(config, dataset, tmp_path / "through", CPU, progress=False)
    assert isinstance(through.optimizer, torch.optim.Adam) == (engine == "reference")
    through.run()
    train(replace(config, max_steps=15), dataset, tmp_path / "stopped", CPU, progress=False)
    train(config, dataset, tmp_path / "stopped", CPU, progress=False)
    states = [torch.load(tmp_path / run / "train_state.pt", weights_only=False)["model_state"]
              for run in ("through", "stopped")]
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
    assert evaluate(through.model, dataset.test_input, dataset.test_target, ["R@10"], 10)["R@10"] > 0.4  # chance: 0.25


def test_the_reference_engine_refuses_the_fast_engines_lazy_optimizer():
    with pytest.raises(GSASRecError, match="sparse_item_updates is an optimizer of the fast engine"):
        tiny_config(engine="reference", sparse_item_updates=True)


def test_config_ml1m_trains_with_the_reference_engine_from_the_fast_engines_first_loss(ml1m_source_path, tmp_path):
    """--set engine=reference on the paper's config: its first batch's loss (without dropout, and with the catalogue
    scores in float32 where bf16 is native) equals the fast engine's, and it trains a few steps."""
    dataset = load_dataset(ensure_dataset("ml1m", ml1m_source_path))
    config = replace(load_config(str(REPO / "config_ml1m.py")), bf16_scores=False)
    torch.manual_seed(0)
    model = build_model(config, dataset.num_items).eval()
    generator = torch.Generator().manual_seed(0)
    batch = training_batch(dataset, np.arange(128), config, generator)
    negatives = sample_negatives(batch, config, dataset.num_items, generator)
    beta = gbce_beta(config.negs_per_pos, dataset.num_items, config.gbce_t)
    losses = [objective(model, batch, negatives, replace(config, engine=engine), beta)
              for engine, objective in (("fast", fast_training.training_loss),
                                        ("reference", reference_loss))]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=5e-5)  # float32 sums of 5 million terms
    progress = train(replace(config, engine="reference", max_steps=2, selection_start_step=0), dataset,
                     tmp_path / "run", CPU, progress=False)
    assert progress.step == 2 and progress.stopped == "max_steps"
