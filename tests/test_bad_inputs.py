"""Every bad input a user can give the scripts or the Python API ends in one clear line, and writes nothing.

Scripts run in this process through run_cli, as their __main__ does: a failure must be SystemExit(2) with exactly
one 'error: ...' line on stderr; any other exception (a traceback for the user) fails the test as it is."""
import contextlib
import io
import os
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
from utils import (atomic_save, build_model, load_model, model_checkpoint, recommend, recommend_batch, resolve_device,
                   run_cli)

sys.path.insert(0, str(REPO / "datasets"))
import prepare_dataset  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> SimpleNamespace:
    """Datasets (one good, several broken), a config file, a checkpoint and broken files, made once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    datasets = root / "datasets"
    for name in ("successor", "bad_id", "text", "bad_stats", "short_val", "empty_val", "one_item_users", "one_item"):
        write_synthetic_dataset(datasets / name)
    (datasets / "one_item" / "dataset_stats.json").write_text('{"num_items": 1}')
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
    saved = torch.load(checkpoint, weights_only=True)
    damaged = {"refused_config": {"config": {**saved["config"], "seed": -1}},
               "non_tensor": {"model_state": {**saved["model_state"], "final_norm.bias": [0.0] * 32}},
               "bad_training_record": {"training": {"steps": 10}}}
    for name, change in damaged.items():
        torch.save({**saved, **change}, root / f"{name}.pt")
    del saved["model_state"]["final_norm.bias"]
    torch.save(saved, root / "missing_tensor.pt")
    del saved["num_items"]
    torch.save(saved, root / "no_item_count.pt")
    official = {"item_embedding.weight": torch.zeros(42, 32), "transformer_blocks.0.first_norm.weight": torch.zeros(32)}
    torch.save(official, root / "official.pt")
    torch.save({**official, "seq_norm.bias": "zeros"}, root / "official_non_tensor.pt")
    torch.save({**official, "item_embedding.weight": torch.zeros(1, 32)}, root / "official_one_row.pt")
    state_config = tiny_config(max_steps=2)  # the "ok" config file's
    state = {**model_checkpoint(build_model(state_config, 40), state_config), "optimizer_state": {},
             "scheduler_state": {}, "progress": {}, "rng_states": []}
    weights = {name: value for name, value in state["model_state"].items() if name != "final_norm.bias"}
    damaged_states = {"state_missing_tensor": {"model_state": weights},
                      "state_refused_config": {"config": {**state["config"], "seed": -1}}}
    for name, change in damaged_states.items():
        (root / name).mkdir()
        torch.save({**state, **change}, root / name / "train_state.pt")
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
    write_config(root / "config_softmax.py", loss="softmax")
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
    "--run-dir inside a file": ("train", lambda w: ["--config", w.ok, "--run-dir", str(w.root / "a_file" / "run")],
                                "a_file is a file, not a folder"),
    "unreadable training state": ("train", lambda w: ["--config", w.ok, "--run-dir", str(w.root / "garbage")],
                                  "train_state.pt is not a readable training state (UnpicklingError"),
    "training state missing a tensor": ("train", lambda w: ["--config", w.ok, "--run-dir",
                                                            str(w.root / "state_missing_tensor")],
                                        "train_state.pt is damaged: missing final_norm.bias"),
    "training state with a refused config": ("train", lambda w: ["--config", w.ok, "--run-dir",
                                                                 str(w.root / "state_refused_config")],
                                             "holds a config this version refuses: invalid config: seed must be in"),
    "--seed negative": ("train", lambda w: train_args(w, "--seed", "-1"), "seed must be in 0..2**32 - 1, got -1"),
    "--seed too large": ("train", lambda w: train_args(w, "--seed", str(2 ** 32)), "seed must be in 0..2**32 - 1"),
    "--set dataset_name with a path": ("train", lambda w: train_args(w, "--set", "dataset_name=../successor"),
                                       "dataset_name must be a folder name"),
    "--set learning_rate=inf": ("train", lambda w: train_args(w, "--set", "learning_rate=inf"),
                                "learning_rate must be a number > 0, got inf"),
    "--device no device type": ("train", lambda w: train_args(w, "--device", "meta"), "unknown device 'meta'"),
    "dataset of one item": ("train", lambda w: train_args(w, "--set", "dataset_name=one_item"),
                            "num_items must be at least 2"),
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
    "checkpoint given twice": ("evaluate", lambda w: [w.checkpoint, "--checkpoint", w.checkpoint],
                               "give the checkpoint once"),
    "--output onto the checkpoint": ("evaluate", lambda w: [w.checkpoint, "--output", w.checkpoint],
                                     "is a file this command reads"),
    "--write-official onto the checkpoint": ("evaluate", lambda w: [w.checkpoint, "--write-official", w.checkpoint],
                                             "is a file this command reads"),
    "--output onto the config": ("evaluate", lambda w: [w.checkpoint, "--config", w.ok, "--output", w.ok],
                                 "is a file this command reads"),
    "--write-official with --output": ("evaluate", lambda w: [w.checkpoint, "--write-official", str(w.root / "o.pt"),
                                                              "--output", str(w.root / "m.json")], "only converts"),
    "--plot not a PNG": ("evaluate", lambda w: [w.checkpoint, "--calibration", "--plot", str(w.root / "p.pdf")],
                         "give a name ending in .png"),
    "--output and --plot the same": ("evaluate", lambda w: [w.checkpoint, "--calibration", "--plot",
                                                            str(w.root / "p.png"), "--output", str(w.root / "p.png")],
                                     "--output and --plot name the same file"),
    "--split unknown": ("evaluate", lambda w: [w.checkpoint, "--split", "train"], "invalid choice: 'train'"),
    "--bins not a number": ("evaluate", lambda w: [w.checkpoint, "--calibration", "--bins", "ten"],
                            "argument --bins: invalid whole number value: 'ten'"),
    "--bins more than the users": ("evaluate", lambda w: [w.checkpoint, "--calibration", "--bins", "301"],
                                   "--bins 301: more bins than the 300 test users"),
    "evaluate unknown device": ("evaluate", lambda w: [w.checkpoint, "--device", "tpu"], "unknown device 'tpu'"),
    "config of another loss": ("evaluate", lambda w: [w.checkpoint, "--config", str(w.root / "config_softmax.py")],
                               "loss=gbce in the checkpoint, softmax in the config"),
    "checkpoint with a refused config": ("evaluate", lambda w: [str(w.root / "refused_config.pt")],
                                         "holds a config this version refuses: invalid config: seed must be in"),
    "checkpoint holding a non-tensor": ("evaluate", lambda w: [str(w.root / "non_tensor.pt")],
                                        "non_tensor.pt is a damaged checkpoint: its model_state is not what"),
    "checkpoint with a damaged training record": ("evaluate", lambda w: [str(w.root / "bad_training_record.pt")],
                                                  "its training is not what a checkpoint holds"),
    "official checkpoint holding a non-tensor": ("evaluate", lambda w: [str(w.root / "official_non_tensor.pt"),
                                                                        "--config", w.ok],
                                                 "damaged official-port checkpoint: it holds something other"),
    "official checkpoint of no items": ("evaluate", lambda w: [str(w.root / "official_one_row.pt"), "--config", w.ok],
                                        r"its item_embedding.weight is (1, 32), not (items + 2, embedding_dim)"),
    # datasets/prepare_dataset.py: flags and raw logs (the log contents have their own table in test_prepare_dataset)
    "prepare without --name": ("prepare", lambda w: ["--input", str(w.root / "log.csv")],
                               "the following arguments are required: --name"),
    "prepare negative threshold": ("prepare", lambda w: ["--input", str(w.root / "log.csv"), "--name", "x",
                                                         "--min-user-interactions", "-1"], "must be >= 0, got -1"),
    "prepare unknown policy": ("prepare", lambda w: ["--input", str(w.root / "log.csv"), "--name", "x",
                                                     "--duplicates", "merge"], "invalid choice: 'merge'"),
    "prepare unreadable Parquet": ("prepare", lambda w: ["--input", str(w.root / "log.parquet"), "--name", "x",
                                                         "--output-dir", str(w.root / "prepared")], "cannot be read"),
    "prepare negative seed": ("prepare", lambda w: ["--input", str(w.root / "log.csv"), "--name", "x", "--seed", "-1"],
                              "argument --seed: must be >= 0, got -1"),
    "prepare seed too large": ("prepare", lambda w: ["--input", str(w.root / "log.csv"), "--name", "x", "--seed",
                                                     str(2 ** 32)], "argument --seed: must be <= 4294967295"),
    "prepare no validation users": ("prepare", lambda w: ["--input", str(w.root / "log.csv"), "--name", "x",
                                                          "--num-val-users", "0"],
                                    "argument --num-val-users: must be >= 1, got 0"),
    "prepare --output-dir inside a file": ("prepare", lambda w: ["--input", str(w.root / "log.csv"), "--name", "x",
                                                                 "--output-dir", str(w.root / "a_file" / "x")],
                                           "a_file is a file, not a folder"),
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
    # the model's constructor
    "item count not a whole number": (lambda w, m: GSASRec(num_items=2.5), "num_items must be a whole number"),
    "sequence_length of 0": (lambda w, m: GSASRec(10, sequence_length=0), "sequence_length must be at least 1"),
    "negative block count": (lambda w, m: GSASRec(10, num_blocks=-1), "num_blocks must be at least 1"),
    "heads that do not divide the width": (lambda w, m: GSASRec(10, embedding_dim=10, num_heads=3),
                                           r"num_heads \(3\) must divide embedding_dim \(10\)"),
    "dropout of 1": (lambda w, m: GSASRec(10, dropout_rate=1.0), r"dropout_rate must be a number in \[0, 1\)"),
    "init std of 0": (lambda w, m: GSASRec(10, embedding_init_std=0), "embedding_init_std must be a number > 0"),
    "unknown block": (lambda w, m: GSASRec(10, block="transformer"), "block must be one of"),
    # the model's forward pass and ranking
    "input of one dimension": (lambda w, m: m(torch.tensor([1, 2, 3])),
                               r"input must be a \(batch, length\) tensor of int64 or int32 .* shape \(3,\)"),
    "input of floats": (lambda w, m: m(torch.ones(2, 3)),
                        r"input must be .* got shape \(2, 3\) and dtype torch.float32"),
    "input not a tensor": (lambda w, m: m.get_predictions([[1, 2]], 5), "input must be .* got a list"),
    "input id past the padding": (lambda w, m: m.get_predictions(torch.tensor([[1, 42]]), 5),
                                  r"input holds ids outside 1..40 \(the items\) and 41 \(padding\)"),
    "input id 0": (lambda w, m: m.get_predictions(torch.tensor([[0, 5]]), 5), "input holds ids outside"),
    "limit of 0": (lambda w, m: m.get_predictions(torch.tensor([[1, 2]]), 0), r"limit must be a whole number in 1..40"),
    "limit past the catalogue": (lambda w, m: m.get_predictions(torch.tensor([[1, 2]]), 41), "limit must be"),
    "rated of another batch": (lambda w, m: m.get_predictions(torch.tensor([[1, 2]]), 5, torch.tensor([[1], [2]])),
                               "rated must have a row for each of the 1 input rows, got 2"),
    "rated id out of range": (lambda w, m: m.get_predictions(torch.tensor([[1, 2]]), 5, torch.tensor([[99]])),
                              "rated holds ids outside"),
    # loading and recommending
    "checkpoint path not a path": (lambda w, m: load_model(3), "checkpoint_path must be a path"),
    "config not a config": (lambda w, m: load_model(w.checkpoint, config={"embedding_dim": 32}),
                            "config must be a GSASRecExperimentConfig or None, got dict"),
    "device not a name": (lambda w, m: load_model(w.checkpoint, device=0), "device must be a name such as 'cpu'"),
    "unknown device": (lambda w, m: load_model(w.checkpoint, device="tpu"), "unknown device 'tpu'"),
    "recommend without a model": (lambda w, m: recommend("model.pt", [1, 2]), "model must be a GSASRec"),
    "exclude_seen not a bool": (lambda w, m: recommend(m, [1, 2], exclude_seen="no"),
                                "exclude_seen must be True or False"),
    "config seed negative": (lambda w, m: GSASRecExperimentConfig(seed=-1), r"seed must be in 0..2\*\*32 - 1"),
}


@pytest.mark.parametrize("case", API_CASES)
def test_a_bad_python_api_call_raises_an_error_a_user_understands(workspace, model, case):
    call, message = API_CASES[case]
    with pytest.raises((GSASRecError, ValueError, TypeError), match=message) as raised:
        call(workspace, model)
    assert type(raised.value) in (GSASRecError, ValueError, TypeError)


def test_a_cuda_device_this_machine_lacks_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(GSASRecError, match=r"device 'cuda:2': this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("script, arguments, folder", [
    ("train", lambda w: ["--config", w.ok, "--run-dir", str(w.root / "locked" / "run")], "locked"),
    ("evaluate", lambda w: [w.checkpoint, "--output", str(w.root / "locked" / "m.json")], "locked"),
    ("prepare", lambda w: ["--input", str(w.root / "log.csv"), "--name", "x", "--output-dir",
                           str(w.root / "locked" / "x")], "locked"),
])
def test_a_folder_the_user_cannot_write_is_refused_before_any_work(workspace, monkeypatch, script, arguments,
                                                                   folder):
    """As the tests may run as root, who may write anywhere, the folder is made unwritable for os.access."""
    locked = workspace.root / folder
    locked.mkdir(exist_ok=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    monkeypatch.chdir(workspace.root)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *arguments(workspace)])
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stderr(stderr), \
            contextlib.redirect_stdout(io.StringIO()):
        run_cli(SCRIPTS[script].main)
    assert exited.value.code == 2 and stderr.getvalue().endswith(f"{locked} is not writable\n")
    assert stderr.getvalue().count("\n") == 1 and not any(locked.iterdir())

