"""The committed ML-1M checkpoints still evaluate to the test metrics recorded in pre_trained/test_metrics.json
(needs the ML-1M file, as in CI)."""
import json

import pytest

from dataset_utils import ensure_dataset, load_dataset
from eval_utils import evaluate
from tests.conftest import REPO, ml1m_source
from utils import load_model

PRE_TRAINED = REPO / "pre_trained"
RECORDED = json.loads((PRE_TRAINED / "test_metrics.json").read_text())
# The paper repository's test nDCG@10 (REFERENCE.md) that committed checkpoints of that kind must reach, by
# the "-t:...-negs:..." part of their name: SASRec and gSASRec (t = 0.75, k = 256).
PAPER_NDCG10 = {"-t:0.0-negs:1-": 0.1259, "-t:0.75-negs:256-": 0.1726}


def test_every_committed_checkpoint_has_recorded_metrics():
    committed = {str(path.relative_to(PRE_TRAINED)) for path in PRE_TRAINED.rglob("*.pt")}
    assert committed == set(RECORDED)
    assert any("-t:0.75-negs:256-" in name for name in committed)
    assert any("-t:0.0-negs:1-" in name for name in committed)
    assert any("-t:1.0-negs:256-" in name for name in committed)


@pytest.mark.parametrize("name", sorted(RECORDED), ids=lambda name: name.split("/")[0])
def test_committed_checkpoint_evaluates_to_its_recorded_metrics(name):
    source = ml1m_source()
    if source is None:
        pytest.skip("set GSASREC_ML1M_SOURCE to the ML-1M file to run this test")
    model, config = load_model(str(PRE_TRAINED / name), device="cpu")
    dataset = load_dataset(ensure_dataset("ml1m", source))
    metrics = evaluate(model, dataset.test_input, dataset.test_target, config.metrics,
                       config.recommendation_limit, config.filter_rated, config.eval_batch_size)
    assert metrics == pytest.approx(RECORDED[name], abs=1e-3)
    for kind, paper_ndcg in PAPER_NDCG10.items():
        if kind in name:
            assert metrics["nDCG@10"] >= paper_ndcg
