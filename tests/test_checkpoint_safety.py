"""A checkpoint from a stranger cannot run code: every checkpoint, official-port state dict and training state is
read with weights_only=True, a file holding anything else is refused in one line, and what this repository writes
loads that way."""
import contextlib
import io
import re
import sys

import pytest
import torch

import train_gsasrec
from config import GSASRecError
from dataset_utils import dataset_directory, load_dataset
from tests.conftest import REPO, run_script, tiny_config, write_config, write_malicious_checkpoint
from utils import (build_model, load_model, load_tensors_file, model_checkpoint, read_checkpoint, rename_parameters,
                   run_cli)

# The refusal, after the file's name; the parenthesis names the first Python object torch's loader refused.
REFUSAL = r" holds Python objects other than tensors and plain values \(\S+\); refusing to load it \(weights_only\)"


@pytest.fixture
def tiny_checkpoint() -> dict:
    torch.manual_seed(0)
    config = tiny_config()
    return model_checkpoint(build_model(config, 40), config)


def test_the_test_file_runs_code_when_loaded_without_weights_only(tmp_path):
    """So the refusals below stop real code, not a harmless file."""
    path = write_malicious_checkpoint(tmp_path / "evil.pt", tmp_path / "marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip format", "legacy format"])
@pytest.mark.parametrize("kind", ["ours", "official"])
def test_load_model_refuses_a_checkpoint_that_would_run_code(tmp_path, tiny_checkpoint, kind, legacy):
    contents = tiny_checkpoint if kind == "ours" else rename_parameters(tiny_checkpoint["model_state"], True)
    path = write_malicious_checkpoint(tmp_path / "evil.pt", tmp_path / "marker", contents, legacy)
    with pytest.raises(GSASRecError, match=REFUSAL):
        load_model(str(path), device="cpu", config=tiny_config())
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("script, options", [("evaluate_gsasrec.py", ()),
                                             ("recommend_gsasrec.py", ("--output", "top.csv")),
                                             ("recommend_gsasrec.py", ("--export-onnx", "top.onnx"))])
def test_the_scripts_refuse_it_in_one_line_with_exit_status_2(tmp_path, tiny_checkpoint, synthetic_datasets_dir,
                                                               script, options):
    """Evaluation, recommendation and the ONNX export: one error line, exit status 2, no marker, nothing written."""
    path = write_malicious_checkpoint(tmp_path / "evil.pt", tmp_path / "marker", tiny_checkpoint)
    result = run_script(str(REPO / script), str(path), "--device", "cpu", *options, cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "marker").exists()
    assert re.fullmatch(f"error: {re.escape(str(path))}{REFUSAL}\n", result.stderr)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["datasets", "evil.pt"]


def test_resuming_a_run_folder_whose_state_would_run_code_is_refused(tmp_path, monkeypatch, synthetic_datasets_dir):
    config = write_config(tmp_path / "config_tiny.py", max_steps=2, max_batches_per_epoch=2)
    run_dir = tmp_path / "run"
    train_gsasrec.train(tiny_config(max_steps=2, max_batches_per_epoch=2), load_dataset(dataset_directory("successor")),
                        run_dir, torch.device("cpu"), progress=False)
    state = run_dir / "train_state.pt"
    write_malicious_checkpoint(state, tmp_path / "marker", torch.load(state, weights_only=True))
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    monkeypatch.setattr(sys, "argv", ["train_gsasrec.py", f"--config={config}", "--run-dir", str(run_dir),
                                      "--no-progress", "--set", "max_steps=4"])
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stderr(stderr), \
            contextlib.redirect_stdout(io.StringIO()):
        run_cli(train_gsasrec.main)
    assert exited.value.code == 2 and not (tmp_path / "marker").exists()
    assert re.fullmatch(f"error: {re.escape(str(state))}{REFUSAL}; start over with --fresh or pass another "
                        "--run-dir\n", stderr.getvalue())
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before


@pytest.mark.parametrize("options", [{}, {"weight_averaging_decay": 0.9, "sparse_item_updates": True},
                                     {"loss": "softmax", "warmup_steps": 1, "lr_decay_steps": 3}],
                         ids=["default", "averaged, sparse", "softmax, schedule"])
def test_what_training_writes_loads_with_weights_only_and_no_allowed_class(tmp_path, synthetic_datasets_dir, options):
    """Every file of a run folder, the training state's optimizer, scheduler, random streams and progress
    included, holds tensors and plain values only (the torch version as text)."""
    run_dir = tmp_path / "run"
    train_gsasrec.train(tiny_config(max_steps=2, max_batches_per_epoch=2, **options),
                        load_dataset(dataset_directory("successor")), run_dir, torch.device("cpu"), progress=False)
    files = sorted(run_dir.glob("*.pt"))
    assert [path.name for path in files if path.name != "train_state.pt"]
    for path in files:
        saved = torch.load(path, weights_only=True)
        assert type(saved["training"]["torch"]) is str, path


def test_checkpoints_written_before_the_torch_version_was_text_still_load(tmp_path, tiny_checkpoint):
    """Earlier checkpoints and training states (the shipped ones among them) stored torch.__version__ itself, a str
    subclass: the one class the loader allows besides tensors and plain values."""
    path = tmp_path / "earlier.pt"
    training = {"seconds": 1.0, "steps": 1, "world_size": 1, "device": "cpu", "threads": 1, "torch": torch.__version__}
    torch.save({**tiny_checkpoint, "training": training}, path)
    assert type(torch.__version__) is not str
    assert read_checkpoint(str(path))["training"]["torch"] == str(torch.__version__)
    assert load_tensors_file(path, "training state")["training"]["torch"] == str(torch.__version__)
