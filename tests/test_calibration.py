import json

import numpy as np
import pytest
import torch

from eval_utils import calibration_report, plot_reliability_diagrams
from utils import atomic_save, build_model, model_checkpoint
from tests.conftest import run_script, tiny_config


def test_calibration_figures_on_hand_made_predictions():
    report = calibration_report(np.array([0.4, 0.1, 0.3, 0.2]), np.array([True, False, True, False]), num_bins=2)
    assert report["mean_top1_probability"] == pytest.approx(0.25)
    assert report["R@1"] == pytest.approx(0.5)
    assert report["overconfidence"] == pytest.approx(0.5)
    assert [(b["predicted"], b["observed"], b["count"]) for b in report["bins"]] == \
        [pytest.approx((0.15, 0.0, 2)), pytest.approx((0.35, 1.0, 2))]
    assert report["ece"] == pytest.approx((0.15 + 0.65) / 2)


def test_a_calibrated_predictor_has_near_zero_error_and_an_overconfident_one_does_not():
    rng = np.random.RandomState(0)
    probabilities = rng.uniform(0, 0.6, 200_000)
    hits = rng.uniform(size=probabilities.shape) < probabilities
    calibrated = calibration_report(probabilities, hits, num_bins=15)
    assert calibrated["ece"] < 0.005 and calibrated["overconfidence"] == pytest.approx(1.0, abs=0.01)
    overconfident = calibration_report(np.minimum(probabilities * 1.5, 1.0), hits, num_bins=15)
    assert overconfident["ece"] > 0.1 and overconfident["overconfidence"] > 1.4


def test_reliability_diagram_and_command_line_report(tmp_path, synthetic_datasets_dir):
    torch.manual_seed(0)
    config = tiny_config()
    checkpoint = tmp_path / "tiny.pt"
    atomic_save(model_checkpoint(build_model(config, 40), config), checkpoint)
    result = run_script("evaluate_gsasrec.py", str(checkpoint), "--calibration", "--bins", "5",
                        "--plot", str(tmp_path / "diagram.png"), "--output", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    assert "expected calibration error (5 equal-mass bins)" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())["calibration"]
    assert len(report["bins"]) == 5 and sum(b["count"] for b in report["bins"]) == 300
    assert (tmp_path / "diagram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # both written through a temporary, renamed into place
    plot_reliability_diagrams({"a": report, "b": report}, str(tmp_path / "two.png"))
    assert (tmp_path / "two.png").stat().st_size > 10_000
