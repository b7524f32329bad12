"""recommend_gsasrec.py: top-k lists in the raw ids of the user's log, streamed to CSV or Parquet; the ONNX export,
which onnxruntime serves with PyTorch's answers; bad input refused in one line."""
import contextlib
import importlib.util
import io
import re
import runpy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import recommend_gsasrec
from dataset_utils import Sequences, ensure_dataset, load_dataset, offsets_from_lengths
from eval_utils import recommend_batched
from tests.conftest import REPO, run_main, tiny_config, write_synthetic_dataset
from utils import atomic_save, build_model, load_model, model_checkpoint

NUM_USERS, NUM_ITEMS, K = 40, 25, 5
spec = importlib.util.spec_from_file_location("prepare_dataset", REPO / "datasets" / "prepare_dataset.py")
prepare_dataset = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_dataset)


def raw_log(seed: int = 0) -> pd.DataFrame:
    """String ids, titles and shuffled rows with distinct times, as a user's own log."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(3, 12, NUM_USERS)
    users = np.repeat([f"user-{user:03d}" for user in range(NUM_USERS)], lengths)
    items = np.concatenate([rng.permutation(NUM_ITEMS)[:length] for length in lengths])
    items[:NUM_ITEMS] = np.arange(NUM_ITEMS)  # every item occurs
    log = pd.DataFrame({"user": users, "item": [f"i{item:02d}" for item in items],
                        "title": [f"Title {item}" for item in items], "time": rng.permutation(len(users))})
    return log.iloc[rng.permutation(len(log))].reset_index(drop=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> SimpleNamespace:
    """A dataset prepared from a raw log by datasets/prepare_dataset.py, a synthetic one without id mapping files
    (as ML-1M), and a randomly initialised checkpoint for each."""
    root = tmp_path_factory.mktemp("recommend")
    log = raw_log()
    log.to_csv(root / "log.csv", index=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["prepare_dataset.py", "--input", str(root / "log.csv"), "--name", "mylog",
                                    "--user-col", "user", "--item-col", "item", "--time-col", "time",
                                    "--title-col", "title", "--output-dir", str(root / "datasets" / "mylog"),
                                    "--min-user-interactions", "0", "--min-item-interactions", "0"])
        with contextlib.redirect_stdout(io.StringIO()):
            prepare_dataset.main()
    write_synthetic_dataset(root / "datasets" / "successor")
    shutil.copytree(root / "datasets" / "mylog", root / "datasets" / "damaged")
    items_tsv = root / "datasets" / "damaged" / "items.tsv"
    items_tsv.write_text("".join(items_tsv.read_text().splitlines(keepends=True)[:-1]))
    torch.manual_seed(0)
    checkpoints = {}
    for name, num_items in (("mylog", NUM_ITEMS), ("successor", 40), ("damaged", NUM_ITEMS)):
        config = tiny_config(dataset_name=name, num_blocks=2)
        checkpoints[name] = root / f"{name}.pt"
        atomic_save(model_checkpoint(build_model(config, num_items), config), checkpoints[name])
    return SimpleNamespace(root=root, log=log, datasets=root / "datasets", checkpoints=checkpoints)


@pytest.fixture(autouse=True)
def datasets_env(workspace, monkeypatch):
    monkeypatch.setenv("GSASREC_DATASETS_DIR", str(workspace.datasets))


def recommend(*arguments) -> tuple[int, str, str]:
    """recommend_gsasrec.py's command line in this process: (exit status, stdout, stderr)."""
    return run_main(recommend_gsasrec, *arguments, "--no-progress")


def read_output(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype={"user_id": str, "item_id": str, "title": str})


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def expected_lists(workspace, histories: Sequences, k: int, exclude_seen: bool = True) -> tuple[np.ndarray, ...]:
    """recommend_batched's lists for the histories, in dataset ids."""
    model, _ = load_model(str(workspace.checkpoints["mylog"]), device="cpu")
    return recommend_batched(model, histories, k, filter_rated=exclude_seen)


@pytest.mark.parametrize("extension", [".csv", ".parquet"])
def test_every_user_gets_the_top_k_after_the_whole_history_in_raw_ids(workspace, tmp_path, extension):
    output = tmp_path / f"top{extension}"
    status, out, err = recommend(workspace.checkpoints["mylog"], "--output", output, "--k", K)
    assert status == 0, err
    assert f"top {K} items of {NUM_USERS} users" in out
    top = read_output(output)
    directory = workspace.datasets / "mylog"
    users, items = read_tsv(directory / "users.tsv"), read_tsv(directory / "items.tsv")
    assert list(top.columns) == ["user_id", "rank", "item_id", "score", "title"]
    assert top["user_id"].tolist() == np.repeat(users["raw_user_id"], K).tolist()
    assert top["rank"].tolist() == list(range(1, K + 1)) * NUM_USERS
    assert (top.groupby("user_id", sort=False)["score"].diff().dropna() <= 0).all()
    # The whole known history, test target included, is what the lists follow and exclude.
    expected_items, expected_scores = expected_lists(workspace, load_dataset(directory).whole_histories(), K)
    assert top["item_id"].tolist() == items["raw_item_id"].to_numpy()[expected_items.ravel() - 1].tolist()
    assert top["title"].tolist() == items["title"].to_numpy()[expected_items.ravel() - 1].tolist()
    np.testing.assert_allclose(top["score"], expected_scores.ravel(), rtol=1e-6)
    seen = set(zip(workspace.log["user"], workspace.log["item"]))
    assert not seen & set(zip(top["user_id"], top["item_id"]))


def test_include_seen_keeps_the_history_in_the_lists(workspace, tmp_path):
    status, _, err = recommend(workspace.checkpoints["mylog"], "--output", tmp_path / "top.csv", "--k", NUM_ITEMS,
                               "--include-seen")
    assert status == 0, err
    top = read_output(tmp_path / "top.csv")
    assert len(top) == NUM_USERS * NUM_ITEMS
    assert set(zip(workspace.log["user"], workspace.log["item"])) <= set(zip(top["user_id"], top["item_id"]))


def test_batches_of_users_write_the_same_rows_as_one_batch(workspace, tmp_path, monkeypatch):
    batches = []

    def counted(model, inputs, *args, **kwargs):
        batches.append(len(inputs))
        return recommend_batched(model, inputs, *args, **kwargs)
    monkeypatch.setattr(recommend_gsasrec, "recommend_batched", counted)
    for name, batch_size in (("one.parquet", 1000), ("many.parquet", 7)):
        status, _, err = recommend(workspace.checkpoints["mylog"], "--output", tmp_path / name, "--batch-size",
                                   batch_size)
        assert status == 0, err
    assert batches == [NUM_USERS] + [7] * 5 + [NUM_USERS - 35]
    one, many = read_output(tmp_path / "one.parquet"), read_output(tmp_path / "many.parquet")
    pd.testing.assert_frame_equal(one.drop(columns="score"), many.drop(columns="score"))
    np.testing.assert_allclose(one["score"], many["score"], rtol=1e-5, atol=1e-6)  # batches change float rounding


def test_a_dataset_without_id_mapping_files_writes_its_own_ids(workspace, tmp_path):
    status, _, err = recommend(workspace.checkpoints["successor"], "--output", tmp_path / "top.parquet", "--k", 3)
    assert status == 0, err
    top = read_output(tmp_path / "top.parquet")
    assert list(top.columns) == ["user_id", "rank", "item_id", "score"]
    assert top["user_id"].tolist() == np.repeat(np.arange(1, 301), 3).tolist()
    model, _ = load_model(str(workspace.checkpoints["successor"]), device="cpu")
    histories = load_dataset(workspace.datasets / "successor").whole_histories()
    assert top["item_id"].tolist() == recommend_batched(model, histories, 3)[0].ravel().tolist()


@pytest.mark.parametrize("extension", [".csv", ".parquet"])
def test_histories_from_a_file_in_raw_ids_skip_unknown_items(workspace, tmp_path, extension):
    items = read_tsv(workspace.datasets / "mylog" / "items.tsv")["raw_item_id"].tolist()
    everything_but_two = items[2:]
    histories = pd.DataFrame({
        "who": ["ann", "ann", "ann", "bob", "cy"] + ["dee"] * len(everything_but_two),
        "what": [items[3], "unknown-1", items[0], "unknown-2", items[5]] + everything_but_two,
        "when": [20, 15, 10, 1, 3] + list(range(len(everything_but_two)))})
    path = tmp_path / f"histories{extension}"
    histories.to_csv(path, index=False) if extension == ".csv" else histories.to_parquet(path)
    status, out, err = recommend(workspace.checkpoints["mylog"], "--output", tmp_path / "top.csv", "--k", K,
                                 "--histories", path, "--user-col", "who", "--item-col", "what", "--time-col", "when")
    assert status == 0, err
    summary = out.splitlines()[0]
    assert "4 users" in summary and "skipped 2 events of 2 items" in summary and "'unknown-1'" in summary
    assert "1 user(s) left with no known item get no list" in summary
    top = read_output(tmp_path / "top.csv")
    assert top.groupby("user_id", sort=False).size().to_dict() == {"ann": K, "cy": K, "dee": 2}
    assert set(top[top["user_id"] == "dee"]["item_id"]) == set(items[:2])
    # ann's history in time order: items[0] (time 10) then items[3] (time 20).
    expected, _ = expected_lists(workspace, Sequences(np.array([1, 4, 6]), offsets_from_lengths(np.array([2, 1]))), K)
    assert top[top["user_id"] != "dee"]["item_id"].tolist() == [items[item - 1] for item in expected.ravel()]


def files_under(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_size for path in root.rglob("*")}


BAD_HISTORIES = {"missing.csv": "user_id,time\nann,1\n", "empty.csv": "", "header.csv": "user_id,item_id\n",
                 "unknown.csv": "user_id,item_id\nann,nothing\nbob,none\n", "log.json": "{}",
                 "no_user.csv": "user_id,item_id\nann,i01\n,i02\n", "bad_time.csv": "user_id,item_id,t\nann,i01,soon\n"}
# (arguments given the workspace, what the one line must say)
CASES = {
    "not a checkpoint": (lambda w: [w.root / "log.csv", "--output", w.out / "top.csv"], "is not a readable checkpoint"),
    "neither output nor export": (lambda w: [w.checkpoints["mylog"]], "one of the arguments --output --export-onnx"),
    "output in a missing folder": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "no" / "top.csv"],
                                   "does not exist"),
    "output of unknown format": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.json"],
                                 "give a file ending in .csv or .parquet"),
    "k above the catalogue": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv", "--k", NUM_ITEMS + 1],
                              f"--k {NUM_ITEMS + 1} is more than the catalogue's {NUM_ITEMS} items"),
    "k of 0": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv", "--k", 0], "must be >= 1"),
    "batch size of 0": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv", "--batch-size", 0],
                        "must be >= 1"),
    "histories with the export": (lambda w: [w.checkpoints["mylog"], "--export-onnx", w.out / "m.onnx",
                                             "--histories", w.out / "missing.csv"], "--histories goes with --output"),
    "histories file missing": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv", "--histories",
                                          w.out / "absent.csv"], "input file not found"),
    "histories without an item column": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv",
                                                    "--histories", w.out / "missing.csv"], "no column(s) 'item_id'"),
    "histories without the time column": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv",
                                                     "--histories", w.out / "header.csv", "--time-col", "t"],
                                          "no column(s) 't'"),
    "empty histories file": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv", "--histories",
                                        w.out / "empty.csv"], "is empty"),
    "histories without events": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv", "--histories",
                                            w.out / "header.csv"], "holds no events"),
    "histories of unknown items only": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv",
                                                   "--histories", w.out / "unknown.csv"],
                                        "none of its 2 items is in the dataset's catalogue"),
    "histories of unknown format": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv", "--histories",
                                               w.out / "log.json"], "cannot tell the format"),
    "histories with a missing user id": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv",
                                                    "--histories", w.out / "no_user.csv"],
                                         "user column 'user_id', data row 2: missing user id"),
    "histories with a bad time": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv", "--histories",
                                             w.out / "bad_time.csv", "--time-col", "t"],
                                  "data row 1: 'soon' is not a number or a date-time"),
    "unknown device": (lambda w: [w.checkpoints["mylog"], "--output", w.out / "top.csv", "--device", "gpu"],
                       "unknown device 'gpu'"),
    "items.tsv without every item": (lambda w: [w.checkpoints["damaged"], "--output", w.out / "top.csv"],
                                     f"items.tsv: expected a column item_id listing 1..{NUM_ITEMS} in order"),
    "dataset not there": (lambda w: [w.root / "elsewhere.pt", "--output", w.out / "top.csv"], "dataset 'elsewhere'"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_with_exit_status_2_and_writes_nothing(workspace, tmp_path, case):
    for name, text in BAD_HISTORIES.items():
        (tmp_path / name).write_text(text)
    config = tiny_config(dataset_name="elsewhere")
    atomic_save(model_checkpoint(build_model(config, NUM_ITEMS), config), workspace.root / "elsewhere.pt")
    arguments, message = CASES[case]
    before = files_under(tmp_path), files_under(workspace.root)
    status, _, err = recommend(*arguments(SimpleNamespace(**vars(workspace), out=tmp_path)))
    lines = err.splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert (files_under(tmp_path), files_under(workspace.root)) == before


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_the_export_without_its_packages_is_one_error_line_naming_them(workspace, tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # what an import of a package that is not installed meets
    status, _, err = recommend(workspace.checkpoints["mylog"], "--export-onnx", tmp_path / "model.onnx")
    message = f"error: --export-onnx needs the package {package}: pip install {package}"
    assert status == 2 and err.splitlines() == [message]
    assert not list(tmp_path.iterdir())


def test_an_export_that_onnxruntime_runs_differently_is_refused(workspace, tmp_path, monkeypatch):
    import onnxruntime

    class Drifting(onnxruntime.InferenceSession):
        def run(self, *args, **kwargs):
            items, scores = super().run(*args, **kwargs)
            return items, scores + 0.01
    monkeypatch.setattr(onnxruntime, "InferenceSession", Drifting)
    status, _, err = recommend(workspace.checkpoints["mylog"], "--export-onnx", tmp_path / "model.onnx")
    assert status == 2 and err.startswith("error: the exported graph's scores differ from PyTorch's") and \
        len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def assert_same_rankings(items, scores, expected_items, expected_scores, tolerance: float = 1e-4) -> None:
    """Scores within tolerance, and the same ids except where two neighbouring expected scores are that close (a
    near-tie, which either side may order either way)."""
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=tolerance)
    close = np.abs(np.diff(expected_scores, axis=1)) < tolerance
    near_tie = np.pad(close, ((0, 0), (1, 0))) | np.pad(close, ((0, 0), (0, 1)))
    assert not ((items != expected_items) & ~near_tie).any()


def onnx_against_pytorch(model, path: Path, windows: np.ndarray, k: int) -> None:
    """onnxruntime's top-k of the exported graph against recommend_batched over the same windows."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    items, scores = session.run(None, {"item_ids": windows.astype(np.int64)})
    assert items.dtype == np.int64 and scores.dtype == np.float32 and items.shape == (len(windows), k)
    is_item = windows != model.padding_id
    expected_items, expected_scores = recommend_batched(
        model, Sequences(windows[is_item], offsets_from_lengths(is_item.sum(1))), k)
    assert_same_rankings(items, scores, expected_items, expected_scores)
    assert not (items[:, :, None] == windows[:, None, :]).any() and not np.isin(items, [0, model.padding_id]).any()


@pytest.mark.parametrize("block", ["sasrec", "ligr"])
@pytest.mark.parametrize("reuse_item_embeddings", [False, True], ids=["separate", "tied"])
def test_onnxruntime_serves_the_export_with_pytorchs_answers(workspace, tmp_path, block, reuse_item_embeddings):
    config = tiny_config(dataset_name="successor", block=block, reuse_item_embeddings=reuse_item_embeddings,
                         num_blocks=2, sequence_length=72, embedding_dim=16)
    torch.manual_seed(1)
    model = build_model(config, 40).eval()
    atomic_save(model_checkpoint(model, config), tmp_path / "model.pt")
    status, out, err = recommend(tmp_path / "model.pt", "--export-onnx", tmp_path / "model.onnx", "--k", 7)
    assert status == 0, err
    assert "(batch, 72) int64 left-padded with 41" in out
    histories = load_dataset(workspace.datasets / "successor").whole_histories()
    for batch in (1, 6):  # the batch axis is dynamic
        windows = histories.windows(np.arange(batch) * 11, 72, model.padding_id)
        onnx_against_pytorch(model, tmp_path / "model.onnx", windows, 7)


@pytest.mark.parametrize("checkpoint", sorted((REPO / "pre_trained").glob("*/*.pt")), ids=lambda path: path.parent.name)
def test_the_shipped_checkpoints_serve_ml1m_test_histories_the_same(ml1m_source_path, tmp_path, checkpoint,
                                                                   monkeypatch):
    monkeypatch.delenv("GSASREC_DATASETS_DIR")
    dataset = load_dataset(ensure_dataset("ml1m", ml1m_source_path))
    model, _ = load_model(str(checkpoint), device="cpu")
    recommend_gsasrec.export_onnx(model, tmp_path / "model.onnx", 10)
    windows = dataset.test_input.windows(np.arange(0, 6040, 24), model.sequence_length, model.padding_id)
    onnx_against_pytorch(model, tmp_path / "model.onnx", windows, 10)


def test_the_serving_docs_client_runs(workspace, tmp_path, capsys):
    status, _, err = recommend(workspace.checkpoints["mylog"], "--export-onnx", tmp_path / "model.onnx")
    assert status == 0, err
    block = re.search(r"```python\n(.*?)```", (REPO / "docs" / "serving.md").read_text(), re.DOTALL).group(1)
    code, replaced = re.subn(r'MODEL = ".*"', f"MODEL = {str(tmp_path / 'model.onnx')!r}", block)
    assert replaced == 1
    (tmp_path / "client.py").write_text(code)
    runpy.run_path(str(tmp_path / "client.py"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(re.fullmatch(r"\[(\d+(, )?)+\] \[.*\]", line) for line in lines)
