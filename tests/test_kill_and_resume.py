"""kill -9 cannot be caught: a run killed at any moment must resume from its files to the same weights, bit for bit."""
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO, write_config

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
