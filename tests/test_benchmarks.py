"""The benchmark that compares steps in one sitting (benchmarks/bench_sitting.py): its rounds alternate with the
official port's way, its summary is computed from what the rounds measured, and a failing measurement ends it with
one line naming the log."""
import json

import torch

from conftest import run_script, write_config
from eval_utils import has_native_bf16

SYNTHETIC = ("--synthetic", "--num-users", "120", "--num-items", "50")


def test_sitting_alternates_with_the_port_and_summarises_each_round(tmp_path):
    config = write_config(tmp_path / "tiny.py")
    finished = run_script("benchmarks/bench_sitting.py", "--config", config, *SYNTHETIC, "--rounds", "2",
                          "--paper-way-steps", "1", "--steps", "1", "--logs", tmp_path / "logs")
    assert finished.returncode == 0, finished.stderr
    lines = [json.loads(line) for line in finished.stdout.splitlines()]
    *rounds, summary = lines
    variants = ["as shipped", "float32"] if has_native_bf16(torch.device("cpu")) else ["as shipped"]
    assert [(line["round"], line["measured"]) for line in rounds] == [
        (round_number, name) for round_number in (1, 2) for name in ["paper way", *variants]]
    assert all(line["benchmark"] == "train_step_paper_way" for line in rounds if line["measured"] == "paper way")
    paper_way = [line["median_s"] for line in rounds if line["measured"] == "paper way"]
    assert summary["paper_way_median_s"] == paper_way
    for name in variants:
        steps = [line["median_s"] for line in rounds if line["measured"] == name]
        assert summary[name]["median_s"] == steps
        assert summary[name]["speed_up"] == [round(paper / step, 1) for paper, step in zip(paper_way, steps)]
    if "float32" in variants:
        assert [line["bf16_scores"] for line in rounds if line["measured"] == "float32"] == [False, False]
    assert len(list((tmp_path / "logs").glob("round*.log"))) == len(rounds)


def test_sitting_stops_at_a_failing_measurement_naming_its_log(tmp_path):
    finished = run_script("benchmarks/bench_sitting.py", "--config", tmp_path / "missing.py", *SYNTHETIC,
                          "--logs", tmp_path / "logs")
    assert finished.returncode != 0
    message = finished.stderr.strip().splitlines()
    assert len(message) == 1 and "paper way failed in round 1" in message[0]
    assert str(tmp_path / "logs" / "round1-paper-way.log") in message[0]
    assert finished.stdout == ""
