"""datasets/prepare_dataset.py: a user's own log becomes a dataset with ML-1M's layout and split."""
import importlib.util
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

from dataset_utils import load_dataset, read_item_titles, validation_user_mask
from tests.conftest import REPO, run_main, run_script

SCRIPT = REPO / "datasets" / "prepare_dataset.py"
spec = importlib.util.spec_from_file_location("prepare_dataset", SCRIPT)
prepare_dataset = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_dataset)


def prepare(monkeypatch, input_path, *options) -> None:
    """Runs the command line in this process (a subprocess costs seconds of imports)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--input", str(input_path), *map(str, options)])
    prepare_dataset.main()


@pytest.fixture
def datasets_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GSASREC_DATASETS_DIR", str(tmp_path / "datasets"))
    return tmp_path / "datasets"


def random_log(num_users: int = 30, seed: int = 0) -> pd.DataFrame:
    """String ids, shuffled rows and few distinct timestamps, so ordering and ties both matter."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(3, 15, num_users)
    users = np.repeat([f"u{user:03d}" for user in rng.permutation(num_users)], lengths)
    log = pd.DataFrame({"user": users, "item": [f"i{item}" for item in rng.randint(0, 25, len(users))],
                        "rating": rng.randint(1, 6, len(users)), "time": rng.randint(0, 6, len(users))})
    return log.iloc[rng.permutation(len(log))].reset_index(drop=True)


def rows(sequences) -> list[list[int]]:
    return [sequences.items[a:b].tolist() for a, b in zip(sequences.offsets[:-1], sequences.offsets[1:])]


def read_tsv(path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def test_split_ids_and_mappings_follow_the_ml1m_scheme(datasets_dir, tmp_path, monkeypatch):
    log = random_log()
    log.to_csv(tmp_path / "log.csv", index=False)
    prepare(monkeypatch, tmp_path / "log.csv", "--name", "mine", "--user-col", "user", "--item-col", "item",
            "--time-col", "time", "--min-user-interactions", 0, "--min-item-interactions", 0,
            "--num-val-users", 10, "--seed", 3)
    directory = datasets_dir / "mine"
    dataset = load_dataset(directory)
    users, items = read_tsv(directory / "users.tsv"), read_tsv(directory / "items.tsv")
    assert users["raw_user_id"].tolist() == list(log["user"].unique())
    assert items["raw_item_id"].tolist() == list(log["item"].unique())
    assert users["user_id"].tolist() == [str(i) for i in range(1, len(users) + 1)]
    assert items["item_id"].tolist() == [str(i) for i in range(1, len(items) + 1)] and dataset.num_items == 25
    raw_item = dict(zip(items["item_id"].astype(int), items["raw_item_id"]))
    # Each user's events by time, equal times in file order; the last one is the test target.
    expected = [log[log["user"] == user].sort_values("time", kind="stable")["item"].tolist()
                for user in users["raw_user_id"]]
    full = [[raw_item[i] for i in history + [target]]
            for history, target in zip(rows(dataset.test_input), dataset.test_target)]
    assert full == expected
    is_val = validation_user_mask(np.arange(1, len(users) + 1), len(users), 10, 3)
    test_rows = rows(dataset.test_input)
    assert rows(dataset.val_input) == [row[:-1] for row, val in zip(test_rows, is_val) if val]
    assert dataset.val_target.tolist() == [row[-1] for row, val in zip(test_rows, is_val) if val]
    assert rows(dataset.train) == [row[:-2] if val else row[:-1] for row, val in zip(test_rows, is_val)]
    stats = json.loads((directory / "dataset_stats.json").read_text())
    assert (stats["num_users"], stats["num_interactions"], stats["num_val_users"]) == (30, len(log), is_val.sum())


def test_equal_timestamps_keep_file_order_and_no_time_column_means_file_order(datasets_dir, tmp_path,
                                                                              monkeypatch):
    rng = np.random.RandomState(1)
    times = rng.randint(0, 3, 300)  # long runs of ties: an unstable sort would reorder them
    assert not np.array_equal(np.argsort(times, kind="quicksort"), np.argsort(times, kind="stable"))
    log = pd.DataFrame({"user_id": [7] * 300 + [8] * 5, "item_id": np.arange(305) + 1000,
                        "timestamp": np.append(times, np.arange(5))})
    log.to_csv(tmp_path / "log.csv", index=False)
    for name, time_options in (("timed", ["--time-col", "timestamp"]), ("untimed", [])):
        prepare(monkeypatch, tmp_path / "log.csv", "--name", name, "--num-val-users", 2, "--min-item-interactions", 0,
                *time_options)
        dataset = load_dataset(datasets_dir / name)
        raw = read_tsv(datasets_dir / name / "items.tsv")["raw_item_id"].astype(int).to_numpy()
        order = np.argsort(times, kind="stable") if time_options else np.arange(300)
        user_7 = rows(dataset.test_input)[0] + [dataset.test_target[0]]
        assert raw[np.array(user_7) - 1].tolist() == (order + 1000).tolist()


def test_iterative_k_core_filtering_and_too_short_users(datasets_dir, tmp_path, monkeypatch, capsys):
    # Item 5 is rare; dropping it leaves C with 2 events, dropping C makes item 4 rare, then D, item 6 and E go.
    # B's first event, on the rare item 7, goes too: after filtering A appears first and becomes user 1.
    histories = {"A": [1, 2, 3], "B": [1, 2, 3], "C": [1, 4, 5], "D": [4, 6, 2], "E": [6, 3, 1]}
    log = pd.DataFrame([("B", 7)] + [(user, item) for user, items in histories.items() for item in items],
                       columns=["user_id", "item_id"])
    log.to_csv(tmp_path / "log.csv", index=False)
    prepare(monkeypatch, tmp_path / "log.csv", "--name", "core", "--min-user-interactions", 3,
            "--min-item-interactions", 2, "--num-val-users", 2)
    stats = json.loads((datasets_dir / "core" / "dataset_stats.json").read_text())
    assert read_tsv(datasets_dir / "core" / "users.tsv")["raw_user_id"].tolist() == ["A", "B"]
    assert read_tsv(datasets_dir / "core" / "items.tsv")["raw_item_id"].tolist() == ["1", "2", "3"]
    assert (stats["num_interactions"], stats["dropped_users_by_filtering"], stats["dropped_items"]) == (6, 3, 4)
    assert "3 dropped by k-core filtering" in capsys.readouterr().out

    # Ids are text: "01" is not "1". User "01" is too short; without its events, item 1 appears first.
    (tmp_path / "short.csv").write_text("user_id,item_id\n01,3\n01,2\n1,1\n1,2\n1,3\n001,1\n001,2\n001,3\n")
    prepare(monkeypatch, tmp_path / "short.csv", "--name", "short", "--min-user-interactions", 0,
            "--min-item-interactions", 0, "--num-val-users", 2)
    stats = json.loads((datasets_dir / "short" / "dataset_stats.json").read_text())
    assert (stats["num_users"], stats["dropped_users_too_short"]) == (2, 1)
    assert read_tsv(datasets_dir / "short" / "users.tsv")["raw_user_id"].tolist() == ["1", "001"]
    assert read_tsv(datasets_dir / "short" / "items.tsv")["raw_item_id"].tolist() == ["1", "2", "3"]
    assert "1 more with fewer than 3 events" in capsys.readouterr().out


@pytest.mark.parametrize("file_name", ["log.parquet", "log.tsv.gz", "log.txt"])
def test_parquet_and_tsv_give_the_same_dataset_as_csv(datasets_dir, tmp_path, monkeypatch, file_name):
    log = random_log(seed=2).assign(title=lambda frame: "Title of " + frame["item"])
    log.to_csv(tmp_path / "log.csv", index=False)
    if file_name.endswith(".parquet"):
        log.to_parquet(tmp_path / file_name)
    else:
        log.to_csv(tmp_path / file_name, sep="\t", index=False)
    options = ["--user-col", "user", "--item-col", "item", "--time-col", "time", "--title-col", "title",
               "--num-val-users", 5, "--min-item-interactions", 2]
    prepare(monkeypatch, tmp_path / "log.csv", "--name", "from_csv", *options)
    prepare(monkeypatch, tmp_path / file_name, "--name", "other", *options)
    for name in ["train/input.txt", "val/input.txt", "val/output.txt", "test/input.txt", "test/output.txt",
                 "items.tsv", "users.tsv"]:
        assert (datasets_dir / "other" / name).read_bytes() == (datasets_dir / "from_csv" / name).read_bytes(), name
    items = read_tsv(datasets_dir / "other" / "items.tsv")
    assert read_item_titles(datasets_dir / "other")[1] == "Title of " + items["raw_item_id"][0]


def test_duplicates_are_kept_by_default_or_dropped(datasets_dir, tmp_path, monkeypatch):
    log = pd.DataFrame({"user_id": [1] * 5 + [2] * 3, "item_id": [1, 2, 2, 3, 2, 1, 2, 3],
                        "timestamp": [1, 2, 2, 3, 4, 1, 1, 1]})
    log.to_csv(tmp_path / "log.csv", index=False)
    common = ["--time-col", "timestamp", "--min-user-interactions", 3, "--min-item-interactions", 0,
              "--num-val-users", 2]
    prepare(monkeypatch, tmp_path / "log.csv", "--name", "kept", *common)
    prepare(monkeypatch, tmp_path / "log.csv", "--name", "dropped", "--duplicates", "drop", *common)
    kept, dropped = load_dataset(datasets_dir / "kept"), load_dataset(datasets_dir / "dropped")
    assert rows(kept.test_input)[0] == [1, 2, 2, 3] and rows(dropped.test_input)[0] == [1, 2, 3]
    assert json.loads((datasets_dir / "dropped" / "dataset_stats.json").read_text())["dropped_duplicates"] == 1
    prepare(monkeypatch, tmp_path / "log.csv", "--name", "kept", "--duplicates", "drop", *common)
    assert rows(load_dataset(datasets_dir / "kept").test_input)[0] == [1, 2, 3]
    assert sorted(path.name for path in datasets_dir.iterdir()) == ["dropped", "kept"]


BAD_INPUTS = {
    "missing file": ("absent.csv", None, [], "input file not found"),
    "misnamed column": ("log.csv", "user_id,item,timestamp\n1,1,1\n", [], "no column(s) 'item_id'; the file has"),
    "empty file": ("log.csv", "", [], "is empty"),
    "header only": ("log.csv", "user_id,item_id\n", [], "holds no events"),
    "bad timestamps": ("log.csv", "user_id,item_id,timestamp\n1,1,2020-01-01\n1,2,yesterday\n1,3,2020-01-03\n",
                       ["--time-col", "timestamp"], "data row 2: 'yesterday' is not a number or a date-time"),
    "no users left": ("log.csv", "user_id,item_id\n1,1\n1,2\n2,1\n", ["--min-user-interactions", 0],
                      "no users left after filtering"),
    "duplicates": ("log.csv", "user_id,item_id,timestamp\n1,1,5\n1,2,6\n1,1,5\n",
                   ["--time-col", "timestamp", "--duplicates", "error", "--min-item-interactions", 0],
                   "data row 3 repeats an earlier event"),
    "unknown extension": ("log.json", "{}", [], "cannot tell the format"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_no_dataset(case, tmp_path):
    file_name, content, options, message = BAD_INPUTS[case]
    if content is not None:
        (tmp_path / file_name).write_text(content)
    status, _, stderr = run_main(prepare_dataset, "--input", tmp_path / file_name, "--name", "mine",
                                 "--num-val-users", "1", "--output-dir", tmp_path / "datasets" / "mine", *options)
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: ") and message in stderr, stderr
    assert not (tmp_path / "datasets").exists() or not any((tmp_path / "datasets").iterdir())


def test_a_folder_holding_other_files_is_not_replaced(tmp_path):
    (tmp_path / "log.csv").write_text("user_id,item_id\n1,1\n1,2\n1,3\n")
    (tmp_path / "notes.txt").write_text("mine")
    result = run_script(str(SCRIPT), "--input", str(tmp_path / "log.csv"), "--name", "x", "--output-dir",
                        str(tmp_path), "--min-item-interactions", "0", "--min-user-interactions", "0")
    assert result.returncode == 2 and "holds other files (log.csv, notes.txt" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "train").exists()


def test_prepared_log_trains_and_evaluates_from_the_command_line(tmp_path):
    """An ML-1M-shaped ratings file (userId, movieId, rating, timestamp) through prepare, train and evaluate."""
    rng = np.random.RandomState(0)
    lengths = rng.randint(8, 30, 120)
    users = np.repeat(np.arange(1, 121), lengths)
    position = np.arange(len(users)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    pd.DataFrame({"userId": users, "movieId": (np.repeat(rng.randint(0, 40, 120), lengths) + position) % 40 + 1,
                  "rating": rng.randint(1, 6, len(users)), "timestamp": 978300000 + position * 60}
                 ).to_csv(tmp_path / "ratings.csv", index=False)
    environment = {**os.environ, "GSASREC_DATASETS_DIR": str(tmp_path / "datasets")}
    prepared = run_script(str(SCRIPT), "--input", str(tmp_path / "ratings.csv"), "--name", "tinyml",
                          "--user-col", "userId", "--item-col", "movieId", "--time-col", "timestamp",
                          env=environment)
    assert prepared.returncode == 0, prepared.stderr
    # 120 users: a tenth of them validate instead of the 512 of ML-1M (user 120 cannot be drawn, as in ML-1M).
    stats = json.loads((tmp_path / "datasets" / "tinyml" / "dataset_stats.json").read_text())
    assert stats["num_val_users"] in (11, 12)
    assert f"validation users: {stats['num_val_users']} (a tenth of the users" in prepared.stdout
    # The printed next step, run as printed (shortened to 20 steps): the ML-1M recipe on the new dataset.
    environment_setting, *printed = prepared.stdout.strip().splitlines()[-1].split()
    assert environment_setting == f"GSASREC_DATASETS_DIR={tmp_path / 'datasets'}"
    assert printed[:4] == ["python3", "train_gsasrec.py", "--config=config_ml1m.py", "--set"]
    assert printed[4:] == ["dataset_name=tinyml"]
    trained = run_script(*printed[1:], "--set", "max_steps=20", "--set", "lr_decay_steps=20",
                         "--set", "selection_start_step=10", "--run-dir",
                         str(tmp_path / "run"), "--device", "cpu", "--no-progress", env=environment)
    assert trained.returncode == 0, trained.stderr
    checkpoint = json.loads(trained.stdout.strip().splitlines()[-1])["best_checkpoint"]
    evaluated = run_script("evaluate_gsasrec.py", checkpoint, "--device", "cpu", "--output",
                           str(tmp_path / "metrics.json"), env=environment)
    assert evaluated.returncode == 0, evaluated.stderr
    assert set(json.loads((tmp_path / "metrics.json").read_text())["metrics"]) == {"nDCG@10", "R@1", "R@10"}
