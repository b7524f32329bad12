"""torchrun with two CPU processes (gloo): sharded users, synchronised gradients, rank-0 checkpoints, resume; and the
devices it refuses before joining the process group."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from config import GSASRecError
from dataset_utils import dataset_directory, load_dataset
from eval_utils import evaluate
from tests.conftest import REPO, write_config
from utils import init_distributed, load_model


def torchrun(config, run_dir) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "train_gsasrec.py", f"--config={config}", "--run-dir", str(run_dir), "--no-progress"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def rank_reports(output: str) -> list[tuple[str, str, str, str]]:
    return sorted(re.findall(r"rank (\d): stopped at epoch (\d+) step (\d+), weights (\w+)", output))


def test_two_processes_train_in_step_and_resume(synthetic_datasets_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config_tiny.py", max_epochs=3)
    result = torchrun(config, run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    reports = rank_reports(result.stdout)
    assert [report[0] for report in reports] == ["0", "1"]
    assert reports[0][1:] == reports[1][1:], "ranks stopped at different points or hold different weights"
    dataset = load_dataset(dataset_directory("successor"))
    steps_per_epoch = -(-len(dataset.train) // 2 // 32)  # each rank: half of the 300 users, 32 per step
    assert reports[0][1:3] == ("3", str(3 * steps_per_epoch))
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["stopped"] == "max_epochs"
    model, config_read = load_model(summary["best_checkpoint"], device="cpu")
    metrics = evaluate(model, dataset.test_input, dataset.test_target, config_read.metrics, 10)
    assert 0 < metrics["nDCG@10"] <= 1
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 3

    write_config(config, max_epochs=4)
    resumed = torchrun(config, run_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"Resuming {run_dir} at step {3 * steps_per_epoch} (epoch 3)" in resumed.stdout
    reports = rank_reports(resumed.stdout)
    assert reports[0][1:] == reports[1][1:] and reports[0][1] == "4"
    saved = torch.load(run_dir / "train_state.pt", weights_only=False)
    assert len(saved["rng_states"]) == 2 and saved["progress"]["step"] == 4 * steps_per_epoch


@pytest.mark.parametrize("device, message", [
    ("tpu", "unknown device 'tpu'"),
    ("cuda:1", "use --device cuda, not cuda:1"),
    ("cuda", "CUDA is not available"),
])
def test_a_device_torchrun_cannot_use_is_refused_before_joining(monkeypatch, device, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    if device == "cuda:1":  # the index is refused wherever CUDA is
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    elif device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(GSASRecError, match=re.escape(message)):
        init_distributed(device)


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(GSASRecError, match="a process for GPU 1, but this machine has 1"):
        init_distributed("cuda")
