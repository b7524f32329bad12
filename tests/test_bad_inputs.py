"""Every bad input a user can give the scripts or the Python API ends in one clear line, and writes nothing.

Scripts run in this process through run_cli, as their __main__ does: a failure must be SystemExit(2) with exactly
one 'error: ...' line on stderr; any other exception (a traceback for the user) fails the test as it is."""
import contextlib
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import evaluate_gsasrec
import train_gsasrec
from config import GSASRecError, GSASRecExperimentConfig
from dataset_utils import load_dataset
from eval_utils import evaluate
from gsasrec import GSASRec
from tests.conftest import REPO, tiny_config, write_config, write_synthetic_dataset
from utils import atomic_save, build_model, load_model, model_checkpoint, recommend, recommend_batch, run_cli

sys.path.insert(0, str(REPO / "datasets"))
import prepare_dataset  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> SimpleNamespace:
    """Datasets (one good, several broken), a config file, a checkpoint and broken files, made once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    datasets = root / "datasets"
    for name in ("successor", "bad_id", "text", "bad_stats", "short_val", "empty_val", "one_item_users"):
        write_synthetic_dataset(datasets / name)
    (datasets / "bad_id" / "train" / "input.txt").write_text("1 2\n3 4\n5 99\n")
    (datasets / "text" / "test" / "input.txt").write_text("1 2 three\n")
    (datasets / "bad_stats" / "dataset_stats.json").write_text('{"num_items": "forty"}')
    (datasets / "short_val" / "val" / "output.txt").write_text("1\n")
    for name in ("input.txt", "output.txt"):
        (datasets / "empty_val" / "val" / name).write_text("")
    (datasets / "one_item_users" / "train" / "input.txt").write_text("7\n" * 300)
    config = tiny_config()
    torch.manual_seed(0)
    checkpoint = root / "tiny.pt"
    atomic_save(model_checkpoint(build_model(config, 40), config), checkpoint)
    saved = torch.load(checkpoint, weights_only=False)
    del saved["model_state"]["final_norm.bias"]
    torch.save(saved, root / "missing_tensor.pt")
    del saved["num_items"]
    torch.save(saved, root / "no_item_count.pt")
    torch.save({"item_embedding.weight": torch.zeros(42, 32), "transformer_blocks.0.first_norm.weight":
                torch.zeros(32)}, root / "official.pt")
    torch.save(torch.zeros(3), root / "tensor.pt")
    (root / "empty.pt").write_bytes(b"")
    for name, content in {"garbage": b"not a pickle", "foreign": None}.items():
        (root / name).mkdir()
        state = root / name / "train_state.pt"
        state.write_bytes(content) if content else torch.save({"weights": torch.zeros(2)}, state)
    (root / "a_file").write_text("")
    (root / "folder").mkdir()
    (root / "log.csv").write_text("user_id,item_id\n1,1\n1,2\n1,3\n")
    (root / "log.parquet").write_bytes(b"no parquet here")
    texts = {"ok": "", "name_error": "x = undefined_name\n", "syntax": "config = (\n",
             "no_config": "from config import GSASRecExperimentConfig\n", "wrong_type": None}
    configs = {}
    for name, text in texts.items():
        configs[name] = root / f"config_{name}.py"
        if text is None:
            configs[name].write_text("from config import GSASRecExperimentConfig\n"
                                     "config = GSASRecExperimentConfig(embedding_dim='128')\n")
        elif name == "ok":
            write_config(configs[name], max_steps=2)
        else:
            configs[name].write_text(text)
    write_config(root / "config_wider.py", embedding_dim=64)
    return SimpleNamespace(root=root, datasets=datasets, ok=str(configs["ok"]), configs=configs,
                           checkpoint=str(checkpoint))


@pytest.fixture(autouse=True)
def datasets_env(workspace, monkeypatch):
    monkeypatch.setenv("GSASREC_DATASETS_DIR", str(workspace.datasets))
    monkeypatch.delenv("GSASREC_ML1M_SOURCE", raising=False)


def train_args(w, *extra) -> list[str]:
    return ["--config", w.ok, "--run-dir", str(w.root / "run"), "--no-progress", *extra]


# (script, arguments given the workspace, what the one line must say)
SCRIPT_CASES = {
    # train_gsasrec.py: flags, config files, overrides, devices, run folders, datasets
    "train without --config": ("train", lambda w: [], "the following arguments are required: --config"),
    "train unknown flag": ("train", lambda w: train_args(w, "--bogus"), "unrecognized arguments: --bogus"),
    "train --seed not a number": ("train", lambda w: train_args(w, "--seed", "x"), "argument --seed: invalid int"),
    "config file missing": ("train", lambda w: ["--config", str(w.root / "absent.py")], "config file not found"),
    "config raises NameError": ("train", lambda w: ["--config", str(w.configs["name_error"])],
                                "config_name_error.py, line 1: NameError"),
    "config syntax error": ("train", lambda w: ["--config", str(w.configs["syntax"])], "config_syntax.py, line 1"),
    "config defines no config": ("train", lambda w: ["--config", str(w.configs["no_config"])],
                                 "must define `config = GSASRecExperimentConfig"),
    "config field of wrong type": ("train", lambda w: ["--config", str(w.configs["wrong_type"])],
                                   "embedding_dim must be int, got '128'"),
    "--set unknown field": ("train", lambda w: train_args(w, "--set", "negs_per_positive=8"),
                            "did you mean negs_per_pos?"),
    "--set value of wrong type": ("train", lambda w: train_args(w, "--set", "num_blocks=two"),
                                  "--set num_blocks: expected int"),
    "--set value out of range": ("train", lambda w: train_args(w, "--set", "gbce_t=2"),
                                 "gbce_t must be in [0, 1], got 2.0"),
    "--set unknown metric": ("train", lambda w: train_args(w, "--set", "metrics=nDCG@10,Foo@10"),
                             "metric 'Foo@10' is not an ir_measures measure"),
    "--set metric cutoff past the lists": ("train", lambda w: train_args(w, "--set", "metrics=nDCG@10,R@50"),
                                           "raise recommendation_limit (10) to at least 50"),
    "unknown device": ("train", lambda w: train_args(w, "--device", "gpu"), "unknown device 'gpu'"),
    "--run-dir is a file": ("train", lambda w: ["--config", w.ok, "--run-dir", str(w.root / "a_file")],
                            "is a file"),
    "unreadable training state": ("train", lambda w: ["--config", w.ok, "--run-dir", str(w.root / "garbage")],
                                  "train_state.pt is not a readable training state (UnpicklingError: damaged, or not written by "
                                  "torch.save); start over with --fresh"),
    "training state of something else": ("train", lambda w: ["--config", w.ok, "--run-dir", str(w.root / "foreign")],
                                         "is not a training state (no config, model_state"),
    "dataset not prepared": ("train", lambda w: train_args(w, "--set", "dataset_name=absent"),
                             "dataset 'absent' not found"),
    "ML-1M source missing": ("train", lambda w: train_args(w, "--set", "dataset_name=ml1m", "--source",
                                                           str(w.root / "ml-1m.txt")), "ML-1M source file not found"),
    "split item id out of range": ("train", lambda w: train_args(w, "--set", "dataset_name=bad_id"),
                                   "train/input.txt, line 3: item id 99 is outside 1..40"),
    "split file with text": ("train", lambda w: train_args(w, "--set", "dataset_name=text"),
                             "test/input.txt: contains something other than space-separated integer item ids"),
    "dataset stats without an item count": ("train", lambda w: train_args(w, "--set", "dataset_name=bad_stats"),
                                            "dataset_stats.json: expected JSON with an integer 'num_items'"),
    "inputs and targets differ in count": ("train", lambda w: train_args(w, "--set", "dataset_name=short_val"),
                                           "input.txt has 64 lines but output.txt has 1"),
    "no validation users": ("train", lambda w: train_args(w, "--set", "dataset_name=empty_val"),
                            "val: no users; validation and test need at least one each"),
    "no sequence to learn from": ("train", lambda w: train_args(w, "--set", "dataset_name=one_item_users"),
                                  "no training sequence has 2 or more items"),
    # evaluate_gsasrec.py: checkpoints and output files
    "evaluate without a checkpoint": ("evaluate", lambda w: [], "give a checkpoint"),
    "checkpoint missing": ("evaluate", lambda w: [str(w.root / "absent.pt")], "checkpoint not found"),
    "checkpoint empty": ("evaluate", lambda w: [str(w.root / "empty.pt")], "is not a readable checkpoint"),
    "checkpoint of something else": ("evaluate", lambda w: [str(w.root / "tensor.pt")],
                                     "neither a gsasrec-pytorch checkpoint nor an official-port state dict"),
    "checkpoint missing a tensor": ("evaluate", lambda w: [str(w.root / "missing_tensor.pt")],
                                    "missing_tensor.pt is damaged: missing final_norm.bias"),
    "checkpoint without its item count": ("evaluate", lambda w: [str(w.root / "no_item_count.pt")],
                                          "is a damaged checkpoint: it has no num_items"),
    "official checkpoint without config": ("evaluate", lambda w: [str(w.root / "official.pt")], "give its config"),
    "config that does not fit": ("evaluate", lambda w: [w.checkpoint, "--config", str(w.root / "config_wider.py")],
                                 "embedding_dim=32 in the checkpoint, 64 in the config"),
    "--bins 0": ("evaluate", lambda w: [w.checkpoint, "--calibration", "--bins", "0"],
                 "argument --bins: must be >= 1, got 0"),
    "--plot without --calibration": ("evaluate", lambda w: [w.checkpoint, "--plot", str(w.root / "p.png")],
                                     "--plot needs --calibration"),
    "--output in a missing folder": ("evaluate", lambda w: [w.checkpoint, "--output", str(w.root / "no" / "m.json")],
                                     "does not exist"),
    "--write-official onto a folder": ("evaluate", lambda w: [w.checkpoint, "--write-official", str(w.root / "folder")],
                                       "is a folder; give a file name"),
    # datasets/prepare_dataset.py: flags and raw logs (the log contents have their own table in test_prepare_dataset)
    "prepare without --name": ("prepare", lambda w: ["--input", str(w.root / "log.csv")],
                               "the following arguments are required: --name"),
    "prepare negative threshold": ("prepare", lambda w: ["--input", str(w.root / "log.csv"), "--name", "x",
                                                         "--min-user-interactions", "-1"], "must be >= 0, got -1"),
    "prepare unknown policy": ("prepare", lambda w: ["--input", str(w.root / "log.csv"), "--name", "x",
                                                     "--duplicates", "merge"], "invalid choice: 'merge'"),
    "prepare unreadable Parquet": ("prepare", lambda w: ["--input", str(w.root / "log.parquet"), "--name", "x",
                                                         "--output-dir", str(w.root / "prepared")], "cannot be read"),
}
SCRIPTS = {"train": train_gsasrec, "evaluate": evaluate_gsasrec, "prepare": prepare_dataset}


def files_under(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_size for path in root.rglob("*")
            if "__pycache__" not in path.parts}


@pytest.mark.parametrize("case", SCRIPT_CASES)
def test_a_bad_script_input_is_one_error_line_with_exit_status_2_and_writes_nothing(workspace, monkeypatch, case):
    script, arguments, message = SCRIPT_CASES[case]
    monkeypatch.chdir(workspace.root)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *arguments(workspace)])
    before = files_under(workspace.root)
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stderr(stderr), \
            contextlib.redirect_stdout(io.StringIO()):
        run_cli(SCRIPTS[script].main)
    lines = stderr.getvalue().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr.getvalue()
    assert message in lines[0]
    assert files_under(workspace.root) == before


@pytest.fixture(scope="module")
def model(workspace) -> GSASRec:
    return load_model(workspace.checkpoint, device="cpu")[0]


# (call given the workspace and a model of 40 items, what the error must say)
API_CASES = {
    "empty history": (lambda w, m: recommend(m, []), "non-empty list of item ids"),
    "history of strings": (lambda w, m: recommend(m, ["7", "8"]), "whole numbers in 1..40"),
    "history of fractions": (lambda w, m: recommend(m, [1.5, 2.0]), "whole numbers in 1..40"),
    "history item out of range": (lambda w, m: recommend(m, [1, 41]), "whole numbers in 1..40"),
    "history of histories": (lambda w, m: recommend(m, [[1, 2], [3]]), "non-empty list of item ids"),
    "no list of histories": (lambda w, m: recommend_batch(m, None), "must be a list of histories"),
    "k of 0": (lambda w, m: recommend(m, [1, 2], k=0), "k must be a whole number >= 1"),
    "checkpoint path missing": (lambda w, m: load_model(str(w.root / "absent.pt")), "checkpoint not found"),
    "config field out of range": (lambda w, m: GSASRecExperimentConfig(num_heads=3), "must divide embedding_dim"),
    "model of no items": (lambda w, m: GSASRec(num_items=0), "num_items must be at least 1"),
    "unknown metric": (lambda w, m: evaluate(m, *(lambda d: (d.test_input, d.test_target))(
        load_dataset(w.datasets / "successor")), ["Foo@10"], 10), "not an ir_measures measure"),
}


@pytest.mark.parametrize("case", API_CASES)
def test_a_bad_python_api_call_raises_an_error_a_user_understands(workspace, model, case):
    call, message = API_CASES[case]
    with pytest.raises((GSASRecError, ValueError), match=message) as raised:
        call(workspace, model)
    assert type(raised.value) in (GSASRecError, ValueError)

