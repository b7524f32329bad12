from dataclasses import replace

import pytest

from config import GSASRecError, GSASRecExperimentConfig
from tests.conftest import REPO
from utils import load_config


def test_defaults_are_the_official_ones():
    config = GSASRecExperimentConfig()
    assert (config.sequence_length, config.embedding_dim, config.train_batch_size, config.num_heads,
            config.num_blocks, config.dropout_rate, config.negs_per_pos, config.max_epochs,
            config.max_batches_per_epoch, config.metrics, config.val_metric, config.early_stopping_patience,
            config.gbce_t, config.filter_rated, config.eval_batch_size, config.recommendation_limit,
            config.reuse_item_embeddings) == (200, 256, 128, 4, 3, 0.0, 256, 10000, 100,
                                              ["nDCG@10", "R@1", "R@10"], "nDCG@10", 200, 0.75, True, 512, 10,
                                              False)


@pytest.mark.parametrize("values, message", [
    ({"negs_per_pos": -1}, "negs_per_pos"),
    ({"gbce_t": 1.5}, "gbce_t"),
    ({"embedding_dim": 130, "num_heads": 4}, "must divide"),
    ({"negative_sampling": "random"}, "negative_sampling"),
    ({"training_window": "oldest"}, "training_window"),
    ({"val_metric": "MRR"}, "val_metric"),
    ({"weight_averaging_decay": 1.0}, "weight_averaging_decay"),
])
def test_invalid_values_are_rejected(values, message):
    with pytest.raises(GSASRecError, match=message):
        GSASRecExperimentConfig(**values)


def test_unknown_fields_are_named(tmp_path):
    with pytest.raises(GSASRecError, match="unknown config field.*negs_per_positive"):
        GSASRecExperimentConfig.from_dict({"negs_per_positive": 3})
    path = tmp_path / "config_typo.py"
    path.write_text("from config import GSASRecExperimentConfig\nconfig = GSASRecExperimentConfig(emb_dim=3)\n")
    with pytest.raises(GSASRecError, match="emb_dim"):
        load_config(str(path))
    with pytest.raises(GSASRecError, match="not found"):
        load_config(str(tmp_path / "absent.py"))


def test_ml1m_configs():
    gsasrec = load_config(str(REPO / "config_ml1m.py"))
    sasrec = load_config(str(REPO / "config_ml1m_sasrec.py"))
    assert (gsasrec.embedding_dim, gsasrec.num_heads, gsasrec.num_blocks, gsasrec.dropout_rate,
            gsasrec.negs_per_pos, gsasrec.gbce_t) == (128, 1, 2, 0.5, 256, 0.75)
    assert (sasrec.negs_per_pos, sasrec.gbce_t) == (1, 0.0)
    per_position = load_config(str(REPO / "config_ml1m_per_position.py"))
    assert (gsasrec.negative_sampling, per_position.negative_sampling) == ("per_sequence", "per_position")
    assert replace(per_position, negative_sampling=gsasrec.negative_sampling) == gsasrec


def test_learning_rate_schedule():
    from train_gsasrec import learning_rate_factor
    config = GSASRecExperimentConfig(warmup_steps=10, lr_decay_steps=100)
    assert learning_rate_factor(config, 0) == pytest.approx(0.1)
    assert learning_rate_factor(config, 9) == pytest.approx(1.0)
    assert learning_rate_factor(config, 60) == pytest.approx(0.5)
    assert learning_rate_factor(config, 110) == pytest.approx(0.0) == learning_rate_factor(config, 500)
    assert learning_rate_factor(GSASRecExperimentConfig(), 12345) == 1.0
