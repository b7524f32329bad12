"""Shared fixtures and helpers: the real ML-1M file when available, tiny synthetic datasets written by the
project's code, a tiny config, running the scripts, and a checkpoint that would run code when loaded."""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from config import GSASRecExperimentConfig  # noqa: E402
from dataset_utils import (Sequences, offsets_from_lengths, split_sequences, validation_user_mask,  # noqa: E402
                           write_split)


def ml1m_source() -> str | None:
    path = os.environ.get("GSASREC_ML1M_SOURCE")
    return path if path and Path(path).is_file() else None


@pytest.fixture
def ml1m_source_path():
    path = ml1m_source()
    if path is None:
        pytest.skip("set GSASREC_ML1M_SOURCE to the ML-1M file to run this test")
    return path


def successor_sequences(num_users: int, num_items: int, min_length: int, max_length: int, seed: int) -> Sequences:
    """Sequences following a deterministic rule: each item is followed by item % num_items + 1."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(min_length, max_length + 1, num_users)
    starts = rng.randint(1, num_items + 1, num_users)
    offsets = offsets_from_lengths(lengths)
    position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    items = (np.repeat(starts - 1, lengths) + position) % num_items + 1
    return Sequences(items.astype(np.int32), offsets)


def write_synthetic_dataset(directory: Path, num_users: int = 300, num_items: int = 40, min_length: int = 6,
                            max_length: int = 20, num_val_users: int = 64, seed: int = 0) -> Path:
    sequences = successor_sequences(num_users, num_items, min_length, max_length, seed)
    user_ids = np.arange(1, num_users + 1)
    is_val_user = validation_user_mask(user_ids, num_users, num_val_users, seed)
    stats = {"num_users": num_users, "num_items": num_items, "num_interactions": int(len(sequences.items))}
    write_split(directory, split_sequences(sequences, is_val_user), stats)
    return directory


@pytest.fixture
def synthetic_datasets_dir(tmp_path, monkeypatch):
    """A datasets folder holding the synthetic dataset 'successor', set as GSASREC_DATASETS_DIR."""
    write_synthetic_dataset(tmp_path / "datasets" / "successor")
    monkeypatch.setenv("GSASREC_DATASETS_DIR", str(tmp_path / "datasets"))
    return tmp_path / "datasets"


# A model small enough to train in seconds on the synthetic dataset 'successor'.
TINY = dict(dataset_name="successor", sequence_length=16, embedding_dim=32, num_heads=1, num_blocks=1,
            dropout_rate=0.1, negs_per_pos=16, gbce_t=0.75, train_batch_size=32, max_batches_per_epoch=10,
            eval_batch_size=64, early_stopping_patience=1000, embedding_init_std=0.1, learning_rate=3e-3,
            per_position_scoring="gathered")  # one way of scoring, so that runs repeat to the bit


def tiny_config(**overrides) -> GSASRecExperimentConfig:
    return GSASRecExperimentConfig(**{**TINY, **overrides})


# The tiny config smaller still, for tests that train many short runs.
SMALL = dict(sequence_length=10, embedding_dim=16, negs_per_pos=8, max_batches_per_epoch=2)


def small_config(**overrides) -> GSASRecExperimentConfig:
    return tiny_config(**{**SMALL, **overrides})


def write_config(path: Path, **overrides) -> Path:
    """A config file of the tiny config with overrides, for the scripts' --config."""
    values = {**TINY, **overrides}
    path.write_text("from config import GSASRecExperimentConfig\nconfig = GSASRecExperimentConfig(" +
                    ", ".join(f"{key}={value!r}" for key, value in values.items()) + ")\n")
    return path


def run_main(module, *arguments) -> tuple[int, str, str]:
    """Runs a script's command line in this process, as its __main__ does (utils.run_cli): (exit status, stdout,
    stderr). Cheaper than run_script, whose process spends about two seconds importing torch."""
    from utils import run_cli
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, arguments)])
        try:
            run_cli(module.main)
            status = 0
        except SystemExit as exited:
            status = exited.code
    return status, stdout.getvalue(), stderr.getvalue()


def run_script(*args, cwd=REPO, **kwargs) -> subprocess.CompletedProcess:
    """Runs python3 ARGS (a script of the repository and its flags), capturing its output."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


class CodeOnLoad:
    """Unpickles by calling Path.touch(marker): a stand-in for any code a stranger's checkpoint could run when it is
    loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


def write_malicious_checkpoint(path: Path, marker: Path, contents: dict | None = None, legacy: bool = False) -> Path:
    """torch.save of `contents` (e.g. a real checkpoint or training state, so that only the way it is loaded stands
    between the file and its code) plus one object that creates `marker` when unpickled; legacy: torch's
    pre-zip format."""
    torch.save({**(contents or {}), "note": CodeOnLoad(marker)}, path, _use_new_zipfile_serialization=not legacy)
    return Path(path)
