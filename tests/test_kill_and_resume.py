"""kill -9 cannot be caught: a run killed at any moment must resume from its files to the same weights, bit for bit;
and a run folder damaged, moved or copied resumes from its training state, keeping what else in it is good."""
import json
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gsasrec
from config import GSASRecError
from dataset_utils import dataset_directory, load_dataset
from tests.conftest import REPO, tiny_config, write_config

# Runs train_gsasrec.py's command line and SIGKILLs itself at the count-th call of one function: a training step's
# loss, a validation, or torch.save, which first writes half its bytes, as a process killed mid-write leaves them.
DRIVER = """
import io, os, signal, sys
sys.path.insert(0, {repo!r})
import fast_training, torch, train_gsasrec, utils
moment, count = sys.argv[1], int(sys.argv[2])
sys.argv = ["train_gsasrec.py"] + sys.argv[3:]
calls = 0

def killing(original, half_write=False):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls < count:
            return original(*args, **kwargs)
        if half_write:
            buffer = io.BytesIO()
            original(args[0], buffer)
            with open(args[1], "wb") as file:
                file.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        else:
            original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return wrapper

if moment == "step":
    fast_training.training_loss = killing(fast_training.training_loss)
elif moment == "validation":
    train_gsasrec.evaluate = killing(train_gsasrec.evaluate)
elif moment == "write":
    torch.save = killing(torch.save, half_write=True)
utils.run_cli(train_gsasrec.main)
"""


def run_training(driver: Path, config: Path, run_dir: Path, moment: str = "none", count: int = 0):
    return subprocess.run([sys.executable, str(driver), moment, str(count), f"--config={config}", "--run-dir",
                           str(run_dir), "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_every_file_is_readable(run_dir: Path) -> None:
    """Checkpoints and the state load, every log line is a JSON record; hidden temporaries are not the run's."""
    for path in run_dir.iterdir():
        if path.name.startswith("."):
            continue
        if path.suffix == ".pt":
            assert "model_state" in torch.load(path, weights_only=False), path
        else:
            assert all("step" in json.loads(line) for line in path.read_text().splitlines()), path


def log_records(run_dir: Path) -> list[dict]:
    """The log without wall-clock times, which differ between runs."""
    return [{key: value for key, value in json.loads(line).items() if key != "time_s"}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_a_run_killed_during_a_step_a_validation_and_a_write_resumes_to_the_uninterrupted_weights(
        synthetic_datasets_dir, tmp_path):
    config = write_config(tmp_path / "config_tiny.py", max_steps=40, max_batches_per_epoch=5, dropout_rate=0.2,
                          negative_sampling="per_position", training_window="random", lr_decay_steps=40)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    reference = run_training(driver, config, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "killed"
    draw = random.Random(27)
    kills = [("step", draw.randint(2, 18)), ("validation", draw.randint(1, 3)), ("write", draw.randint(1, 3))]
    for moment, count in kills:
        killed = run_training(driver, config, run_dir, moment, count)
        assert killed.returncode == -signal.SIGKILL, (moment, count, killed.stdout, killed.stderr)
        assert_every_file_is_readable(run_dir)
        if moment == "write":
            assert any(path.name.endswith(".tmp") for path in run_dir.iterdir())
    resumed = run_training(driver, config, run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout
    assert not any(path.name.startswith(".") for path in run_dir.iterdir())

    final, expected = (torch.load(folder / "train_state.pt", weights_only=False)
                       for folder in (run_dir, tmp_path / "reference"))
    assert final["progress"]["step"] == expected["progress"]["step"] == 40
    for name, value in expected["model_state"].items():
        assert torch.equal(final["model_state"][name], value), name
    best = [sorted(path.name for path in folder.glob("gsasrec-*.pt")) for folder in (run_dir, tmp_path / "reference")]
    assert best[0] == best[1] and len(best[0]) == 1
    assert log_records(run_dir) == log_records(tmp_path / "reference")


# A run folder someone else damaged, moved or copied: the state is the run; everything else is kept where good.

CPU = torch.device("cpu")


def tiny_run(run_dir: Path, max_steps: int) -> train_gsasrec.Progress:
    """Trains (or resumes) a tiny run of 2 steps an epoch in this process."""
    return train_gsasrec.train(tiny_config(max_steps=max_steps, max_batches_per_epoch=2),
                               load_dataset(dataset_directory("successor")), run_dir, CPU, progress=False)


@pytest.mark.parametrize("best_damage", ["missing", "truncated"])
def test_a_damaged_moved_run_folder_resumes_from_its_state_and_keeps_what_is_good(synthetic_datasets_dir, tmp_path,
                                                                                   capsys, best_damage):
    """Damaged log lines go with a note and the whole ones stay; a best checkpoint that is missing or unreadable is
    replaced by the next validated model; stray temporaries go; the best checkpoint is found in the folder where
    the run now is."""
    tiny_run(tmp_path / "run", max_steps=4)
    run_dir = tmp_path / "run"
    log = run_dir / "log.jsonl"
    good = log.read_text().splitlines()
    log.write_text(f"{good[0]}\nnot json\n{{\"epoch\": 1}}\n{good[1]}\n{{\"step\": 6, \"ep")
    best, = run_dir.glob("gsasrec-*.pt")
    if best_damage == "missing":
        best.unlink()
    else:
        best.write_bytes(best.read_bytes()[:100])
    (run_dir / ".train_state.pt.tmp").write_bytes(b"half")
    moved = tmp_path / "moved"
    run_dir.rename(moved)
    capsys.readouterr()

    progress = tiny_run(moved, max_steps=6)
    out = capsys.readouterr().out
    assert progress.step == 6 and "Resuming" in out
    assert "had 3 damaged line(s); they are dropped and the other records kept" in out
    assert "the best checkpoint is unusable" in out
    records = [json.loads(line) for line in (moved / "log.jsonl").read_text().splitlines()]
    assert [json.dumps(record) for record in records[:2]] == good and [r["step"] for r in records] == [2, 4, 6]
    assert sorted(path.name for path in moved.iterdir()) == sorted(
        ["log.jsonl", "train_state.pt", Path(progress.best_checkpoint).name])
    assert Path(progress.best_checkpoint).parent == moved and "-step:6-" in progress.best_checkpoint


def test_an_epoch_logged_but_killed_before_its_first_state_is_not_logged_twice(synthetic_datasets_dir, tmp_path):
    tiny_run(tmp_path / "run", max_steps=2)
    (tmp_path / "run" / "train_state.pt").unlink()
    progress = tiny_run(tmp_path / "run", max_steps=2)
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()] == [2]
    assert [path.name for path in (tmp_path / "run").glob("gsasrec-*.pt")] == [Path(progress.best_checkpoint).name]


def test_the_best_checkpoint_the_state_names_stays_until_a_state_names_its_successor(synthetic_datasets_dir,
                                                                                     tmp_path, monkeypatch):
    """Killed after a better epoch wrote its checkpoint but before the state was saved, the folder still holds the
    checkpoint the state names."""
    first = tiny_run(tmp_path / "run", max_steps=2).best_checkpoint
    calls = []

    def killed_after_validation(self):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_gsasrec, "evaluate", lambda *args, **kwargs: {"nDCG@10": 1.0, "R@1": 1.0, "R@10": 1.0})
    monkeypatch.setattr(train_gsasrec.Trainer, "save_state", killed_after_validation)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "run", max_steps=4)
    assert calls and len(list((tmp_path / "run").glob("gsasrec-*.pt"))) == 2
    assert Path(first).is_file() and torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)[
        "progress"]["best_checkpoint"] == first


@pytest.mark.parametrize("change, message", [
    ({"progress": {"step": "two"}}, r"\(ValueError: its progress holds a wrong kind of value for step\)"),
    ({"rng_states": None}, r"\(TypeError: object of type 'NoneType' has no len\(\)\)"),
    ({"scheduler_state": 5}, r"\(AttributeError: "),
])
def test_a_training_state_damaged_inside_is_one_line_naming_it(synthetic_datasets_dir, tmp_path, change, message):
    tiny_run(tmp_path / "run", max_steps=2)
    state = tmp_path / "run" / "train_state.pt"
    saved = torch.load(state, weights_only=True)
    if "progress" in change:
        change = {"progress": {**saved["progress"], **change["progress"]}}
    torch.save({**saved, **change}, state)
    with pytest.raises(GSASRecError, match=f"{re.escape(str(state))} is damaged {message}.*; start over with --fresh"):
        tiny_run(tmp_path / "run", max_steps=4)
