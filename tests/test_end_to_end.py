"""Train, resume, reload and evaluate on a tiny synthetic dataset whose next item follows a fixed rule."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from config import GSASRecError
from dataset_utils import dataset_directory, load_dataset
from eval_utils import evaluate, recommend_batched
from tests.conftest import REPO, run_script, tiny_config, write_config
from train_gsasrec import train
from utils import build_model, load_model, model_from_checkpoint, read_checkpoint

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


def test_command_line_seed_overrides_the_config_and_is_saved(synthetic_datasets_dir, tmp_path):
    """--seed 42 reproduces the config's seed 42; --seed 7 trains differently, in its own default run folder."""
    config = write_config(tmp_path / "config_tiny.py", seed=42, max_steps=3)
    run_dirs = {"config": tmp_path / "config", "seed42": tmp_path / "seed42",
                "seed7": tmp_path / "models" / "config_tiny-seed7"}
    for name, extra_args in (("config", ["--run-dir", str(run_dirs["config"])]),
                             ("seed42", ["--run-dir", str(run_dirs["seed42"]), "--seed", "42"]),
                             ("seed7", ["--seed", "7"])):
        result = run_script(str(REPO / "train_gsasrec.py"), f"--config={config}", *extra_args, "--no-progress",
                            cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    saved = {name: torch.load(run_dir / "train_state.pt", weights_only=False) for name, run_dir in run_dirs.items()}
    assert [saved[name]["config"]["seed"] for name in ("config", "seed42", "seed7")] == [42, 42, 7]
    embeddings = {name: state["model_state"]["item_embedding.weight"] for name, state in saved.items()}
    assert torch.equal(embeddings["config"], embeddings["seed42"])
    assert not torch.equal(embeddings["config"], embeddings["seed7"])
    other_seed = run_script("train_gsasrec.py", f"--config={config}", "--run-dir", str(run_dirs["seed7"]),
                            "--seed", "8", "--no-progress")
    assert other_seed.returncode == 2 and "different config" in other_seed.stderr


def test_set_overrides_reach_the_checkpoint_and_the_run_folder_name(synthetic_datasets_dir, tmp_path):
    """--set gbce_t=1.0 --set negs_per_pos=4 trains that config, saves it, and names the default run folder after it;
    a bad override is one line on stderr with exit status 2 and writes nothing."""
    config = write_config(tmp_path / "config_tiny.py", max_steps=3)
    result = run_script(str(REPO / "train_gsasrec.py"), f"--config={config}", "--set", "gbce_t=1.0",
                        "--set", "negs_per_pos=4", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "models" / "config_tiny-gbce_t=1.0-negs_per_pos=4"
    saved = read_checkpoint(str(run_dir / "train_state.pt"))
    assert (saved["config"]["gbce_t"], saved["config"]["negs_per_pos"]) == (1.0, 4)
    assert saved["training"]["steps"] == 3 and saved["training"]["seconds"] > 0
    assert {"device", "threads", "torch", "native_bf16"} <= set(saved["training"])
    bad = run_script(str(REPO / "train_gsasrec.py"), f"--config={config}", "--set", "negs_per_position=4",
                     "--no-progress", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --set negs_per_position: no such config field "
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
