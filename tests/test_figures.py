"""The learning-curve figure of pre_trained/make_figures.py, on logs written as train_gsasrec.py writes them."""
import json
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "pre_trained"))
from make_figures import learning_curves  # noqa: E402


def write_log(path, steps, tested_steps):
    with open(path, "w") as log:
        for step in steps:
            record = {"step": step, "epoch": step // 10, "time_s": step * 2.0, "train_loss": 0.1,
                      "val_nDCG@10": step / 1000}
            if step in tested_steps:
                record["test_nDCG@10"] = step / 900
            log.write(json.dumps(record) + "\n")


def test_test_metrics_are_drawn_where_the_log_has_them(tmp_path):
    """One run logged test metrics throughout; another only until it was resumed without them."""
    write_log(tmp_path / "full.jsonl", range(10, 60, 10), range(10, 60, 10))
    write_log(tmp_path / "partial.jsonl", range(10, 60, 10), [10, 20])
    output = tmp_path / "curves.png"
    figure = learning_curves({"full": str(tmp_path / "full.jsonl"), "partial": str(tmp_path / "partial.jsonl")},
                             str(output), target=0.05, by_steps=True)
    lines = {line.get_label(): list(line.get_xdata()) for line in figure.axes[0].get_lines()}
    assert lines["full: test"] == [10, 20, 30, 40, 50]
    assert lines["partial: test"] == [10, 20]
    assert lines["partial: validation"] == [10, 20, 30, 40, 50]
    assert output.stat().st_size > 0


def test_test_only_curves_leave_out_validation(tmp_path):
    write_log(tmp_path / "run.jsonl", range(10, 60, 10), range(10, 60, 10))
    figure = learning_curves({"run": str(tmp_path / "run.jsonl")}, str(tmp_path / "curves.png"), target=None,
                             by_steps=True, test_only=True)
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["run: test"]


def test_the_validation_pick_is_marked_on_the_test_curve(tmp_path):
    """The dot sits where early stopping keeps its checkpoint: the first of two equal validation peaks; y_min
    zooms in on the top of the curves."""
    validation, test = [0.1, 0.3, 0.2, 0.3, 0.1], [0.05, 0.15, 0.25, 0.35, 0.45]
    with open(tmp_path / "run.jsonl", "w") as log:
        for index, (val, tested) in enumerate(zip(validation, test)):
            log.write(json.dumps({"step": 10 * (index + 1), "time_s": 1.0, "val_nDCG@10": val,
                                  "test_nDCG@10": tested}) + "\n")
    figure = learning_curves({"run": str(tmp_path / "run.jsonl")}, str(tmp_path / "curves.png"), target=None,
                             by_steps=True, test_only=True, mark_picks=True, y_min=0.12)
    marks = [line for line in figure.axes[0].get_lines() if line.get_label() == "run: validation pick"]
    assert len(marks) == 1
    assert list(marks[0].get_xdata()) == [20] and list(marks[0].get_ydata()) == [0.15]
    assert figure.axes[0].get_ylim()[0] == 0.12


def test_gzipped_logs_and_the_runs_own_validation_metric(tmp_path):
    """A shipped log is gzipped; the pick follows the metric the run selected on and its selection start."""
    import gzip
    records = [{"step": 10 * (index + 1), "time_s": 1.0, "val_nDCG@10": val10, "val_nDCG@100": val100,
                "test_nDCG@10": tested}
               for index, (val10, val100, tested) in enumerate([(0.3, 0.1, 0.1), (0.1, 0.2, 0.2), (0.2, 0.3, 0.3)])]
    path = tmp_path / "log.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(record) + "\n" for record in records).encode()))
    picks = {}
    for metric in ("nDCG@10", "nDCG@100"):
        figure = learning_curves({"run": str(path)}, str(tmp_path / "curves.png"), target=None, by_steps=True,
                                 test_only=True, mark_picks=True, val_metric=metric)
        mark, = [line for line in figure.axes[0].get_lines() if line.get_label() == "run: validation pick"]
        picks[metric] = list(mark.get_xdata())
    assert picks == {"nDCG@10": [10], "nDCG@100": [30]}
    figure = learning_curves({"run": str(path)}, str(tmp_path / "curves.png"), target=None, by_steps=True,
                             test_only=True, mark_picks=True, pick_from_step=20)
    mark, = [line for line in figure.axes[0].get_lines() if line.get_label() == "run: validation pick"]
    assert list(mark.get_xdata()) == [30]  # the best nDCG@10 from step 20 on
