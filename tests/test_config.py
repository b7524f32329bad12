import dataclasses
from dataclasses import replace

import pytest

from config import GSASRecError, GSASRecExperimentConfig
from tests.conftest import REPO
from utils import apply_overrides, load_config, read_checkpoint


def test_defaults_are_the_official_ones():
    config = GSASRecExperimentConfig()
    assert (config.sequence_length, config.embedding_dim, config.train_batch_size, config.num_heads,
            config.num_blocks, config.dropout_rate, config.negs_per_pos, config.max_epochs,
            config.max_batches_per_epoch, config.metrics, config.val_metric, config.early_stopping_patience,
            config.gbce_t, config.filter_rated, config.eval_batch_size, config.recommendation_limit,
            config.reuse_item_embeddings) == (200, 256, 128, 4, 3, 0.0, 256, 10000, 100,
                                              ("nDCG@10", "R@1", "R@10"), "nDCG@10", 200, 0.75, True, 512, 10,
                                              False)
    assert (config.negative_sampling, config.engine) == ("per_position", "fast")  # the paper's draw


def test_a_config_is_frozen_and_variants_are_validated_copies():
    """Fields cannot be changed in place (that would skip validation); replace() validates the copy, and metrics
    given as a list, as config files and --set give them, are kept as a tuple."""
    config = GSASRecExperimentConfig(metrics=["nDCG@10", "R@10"])
    assert config.metrics == ("nDCG@10", "R@10")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gbce_t = 2.0
    with pytest.raises(GSASRecError, match="gbce_t must be in"):
        dataclasses.replace(config, gbce_t=2.0)


@pytest.mark.parametrize("values, message", [
    ({"negs_per_pos": -1}, "negs_per_pos"),
    ({"gbce_t": 1.5}, "gbce_t"),
    ({"embedding_dim": 130, "num_heads": 4}, "must divide"),
    ({"negative_sampling": "random"}, "negative_sampling"),
    ({"training_window": "oldest"}, "training_window"),
    ({"user_sampling": "by_length", "training_window": "random"}, "user_sampling must be one of"),
    ({"user_sampling": "per_interaction"}, "needs training_window='random'"),
    ({"val_metric": "MRR"}, "val_metric"),
    ({"weight_averaging_decay": 1.0}, "weight_averaging_decay"),
    ({"max_steps": 100, "selection_start_step": 101},
     r"selection_start_step \(101\) is past max_steps \(100\).*--set selection_start_step=80 "),
    ({"selection_start_step": -1}, "selection_start_step must be >= 0"),
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


PAPER_HYPERPARAMETERS = {"sequence_length": 200, "embedding_dim": 128, "num_heads": 1, "num_blocks": 2,
                         "dropout_rate": 0.5, "train_batch_size": 128, "negs_per_pos": 256, "gbce_t": 0.75,
                         "negative_sampling": "per_position"}


def test_ml1m_configs():
    """config_ml1m.py is the paper's model, loss and negatives; the official one differs only in the recipe; SASRec
    and t = 1.0 are config_ml1m.py with their loss changed."""
    configs = {name: load_config(str(REPO / f"config_ml1m{name}.py"))
               for name in ("", "_official", "_sasrec", "_calibrated")}
    for name in ("", "_official"):
        assert {field: getattr(configs[name], field) for field in PAPER_HYPERPARAMETERS} == PAPER_HYPERPARAMETERS
    official = configs["_official"]
    assert (official.embedding_init_std, official.lr_decay_steps, official.max_steps, official.val_metric,
            official.early_stopping_patience) == (None, 0, None, "nDCG@10", 200)
    assert replace(configs[""], gbce_t=1.0) == configs["_calibrated"]
    sasrec = configs["_sasrec"]
    assert (sasrec.negs_per_pos, sasrec.gbce_t, sasrec.negative_sampling) == (1, 0.0, "per_position")
    assert replace(configs[""], negs_per_pos=1, gbce_t=0.0, prior_score_init=False, lr_decay_steps=sasrec.max_steps,
                   max_steps=sasrec.max_steps, selection_start_step=sasrec.selection_start_step) == sasrec
    for config in (configs[""], sasrec):
        assert 0.5 * config.max_steps < config.selection_start_step < config.max_steps == config.lr_decay_steps


def test_the_official_checkpoint_was_trained_with_config_ml1m_official():
    checkpoint, = (REPO / "pre_trained" / "config_ml1m_official").glob("*.pt")
    saved = GSASRecExperimentConfig.from_dict(read_checkpoint(str(checkpoint))["config"])
    assert saved == load_config(str(REPO / "config_ml1m_official.py"))


@pytest.mark.parametrize("overrides, expected", [
    (["gbce_t=1.0"], {"gbce_t": 1.0}),
    (["negs_per_pos=16", "seed=3"], {"negs_per_pos": 16, "seed": 3}),
    (["max_steps=None", "weight_averaging_decay=0.99"], {"max_steps": None, "weight_averaging_decay": 0.99}),
    (["bf16=true", "filter_rated=False"], {"bf16": True, "filter_rated": False}),
    (["metrics=nDCG@10, R@5", "val_metric=R@5"], {"metrics": ("nDCG@10", "R@5"), "val_metric": "R@5"}),
    (["training_window = latest"], {"training_window": "latest"}),
])
def test_overrides_are_parsed_to_the_field_type(overrides, expected):
    config = apply_overrides(GSASRecExperimentConfig(), overrides)
    assert replace(GSASRecExperimentConfig(), **expected) == config
    assert {name: type(getattr(config, name)) for name in expected} == {name: type(value)
                                                                         for name, value in expected.items()}


@pytest.mark.parametrize("override, message", [
    ("negs_per_positive=3", r"no such config field \(did you mean negs_per_pos\?\)"),
    ("gbce_t=high", "gbce_t: expected float, got 'high'"),
    ("max_steps=1.5", "max_steps: expected int or None"),
    ("num_blocks=None", "num_blocks: expected int, got 'None'"),
    ("bf16=yes", "bf16: expected true or false"),
    ("gbce_t", "expected FIELD=VALUE"),
    ("gbce_t=1.5", "invalid config: gbce_t"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(GSASRecError, match=message):
        apply_overrides(GSASRecExperimentConfig(), [override])


def test_learning_rate_schedule():
    from train_gsasrec import learning_rate_factor
    config = GSASRecExperimentConfig(warmup_steps=10, lr_decay_steps=100)
    assert learning_rate_factor(config, 0) == pytest.approx(0.1)
    assert learning_rate_factor(config, 9) == pytest.approx(1.0)
    assert learning_rate_factor(config, 60) == pytest.approx(0.5)
    assert learning_rate_factor(config, 110) == pytest.approx(0.0) == learning_rate_factor(config, 500)
    assert learning_rate_factor(GSASRecExperimentConfig(), 12345) == 1.0


@pytest.mark.parametrize("body, message", [
    ("config = GSASRecExperimentConfig(\n    embedding_dim=undefined_name)",
     r"line 3: NameError: name 'undefined_name'"),
    ("config = GSASRecExperimentConfig(", r"line 2: '\(' was never closed"),
    ("import no_such_module", "line 2: ModuleNotFoundError"),
    ("config = GSASRecExperimentConfig(embedding_dim='64')", "embedding_dim must be int, got '64'"),
    ("config = GSASRecExperimentConfig(gbce_t='high')", "gbce_t must be float, got 'high'"),
    ("config = GSASRecExperimentConfig(max_steps=2.5)", "max_steps must be int or None, got 2.5"),
    ("config = GSASRecExperimentConfig(bf16=1)", "bf16 must be bool, got 1"),
    ("config = GSASRecExperimentConfig(metrics='nDCG@10')", "metrics must be tuple"),
    ("config = 3", "must define `config = GSASRecExperimentConfig"),
])
def test_a_broken_config_file_is_one_error_naming_the_file_and_line(tmp_path, body, message):
    path = tmp_path / "config_broken.py"
    path.write_text("from config import GSASRecExperimentConfig\n" + body + "\n")
    with pytest.raises(GSASRecError, match=message) as raised:
        load_config(str(path))
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


# One bad --set value per config field and the words of its refusal; a new field needs a line here (and a valid
# range in docs/configuration.md).
BAD_VALUE_PER_FIELD = {
    "dataset_name": ("../ml1m", "dataset_name must be a folder name"),
    "sequence_length": ("0", "sequence_length must be >= 1"),
    "embedding_dim": ("12.5", "embedding_dim: expected int, got '12.5'"),
    "train_batch_size": ("0", "batch sizes must be >= 1"),
    "num_heads": ("3", r"num_heads \(3\) must divide embedding_dim \(256\)"),
    "num_blocks": ("0", "num_blocks must be >= 1"),
    "dropout_rate": ("1", r"dropout_rate must be in \[0, 1\)"),
    "negs_per_pos": ("0", "negs_per_pos must be >= 1"),
    "max_epochs": ("0", "max_epochs and max_batches_per_epoch must be >= 1"),
    "max_batches_per_epoch": ("-3", "max_epochs and max_batches_per_epoch must be >= 1"),
    "metrics": ("nDCG@10,Foo@10", "metric 'Foo@10' is not an ir_measures measure"),
    "val_metric": ("MRR@10", "val_metric 'MRR@10' must be one of metrics"),
    "early_stopping_patience": ("0", "early_stopping_patience must be >= 1"),
    "gbce_t": ("nan", r"gbce_t must be in \[0, 1\]"),
    "filter_rated": ("maybe", "filter_rated: expected true or false"),
    "eval_batch_size": ("0", "batch sizes must be >= 1"),
    "recommendation_limit": ("0", "recommendation_limit must be >= 1"),
    "reuse_item_embeddings": ("1", "reuse_item_embeddings: expected true or false"),
    "seed": ("-1", r"seed must be in 0..2\*\*32 - 1, got -1"),
    "loss": ("bpr", "loss must be one of"),
    "logq_correction": ("true", "logq_correction applies to loss='sampled_softmax' only"),
    "block": ("transformer", "block must be one of"),
    "ligr_feed_forward_multiplier": ("0", "ligr_feed_forward_multiplier must be >= 1"),
    "negative_sampling": ("random", "negative_sampling must be one of"),
    "training_window": ("oldest", "training_window must be one of"),
    "user_sampling": ("per_interaction", "needs training_window='random'"),
    "learning_rate": ("inf", "learning_rate must be a number > 0, got inf"),
    "warmup_steps": ("-1", "warmup_steps and lr_decay_steps must be >= 0"),
    "lr_decay_steps": ("-100", "warmup_steps and lr_decay_steps must be >= 0"),
    "embedding_init_std": ("0", "embedding_init_std must be a number > 0 or None"),
    "prior_score_init": ("yes", "prior_score_init: expected true or false"),
    "bf16": ("None", "bf16: expected true or false"),
    "bf16_scores": ("on", "bf16_scores: expected true or false"),
    "sparse_item_updates": ("2", "sparse_item_updates: expected true or false"),
    "weight_averaging_decay": ("1.5", r"weight_averaging_decay must be in \(0, 1\)"),
    "selection_start_step": ("-1", "selection_start_step must be >= 0"),
    "engine": ("slow", "engine must be one of"),
    "per_position_scoring": ("fastest", "per_position_scoring must be one of"),
    "max_steps": ("0", "max_steps must be >= 1"),
    "max_training_time": ("-5", "max_training_time must be > 0"),
}


def test_every_config_field_has_a_bad_value_case():
    assert set(BAD_VALUE_PER_FIELD) == {field.name for field in dataclasses.fields(GSASRecExperimentConfig)}


@pytest.mark.parametrize("field", BAD_VALUE_PER_FIELD)
def test_a_bad_value_of_any_field_is_refused_in_one_line_naming_it(field):
    text, message = BAD_VALUE_PER_FIELD[field]
    with pytest.raises(GSASRecError, match=message) as raised:
        apply_overrides(GSASRecExperimentConfig(), [f"{field}={text}"])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("loss, negative_sampling, expected", [
    ("gbce", "per_position", True), ("sampled_softmax", "per_position", True), ("gbce", "per_sequence", False),
    ("softmax", "per_position", False)])
def test_per_position_negatives_only_where_a_loss_draws_them_per_position(loss, negative_sampling, expected):
    """The full softmax draws no negatives, whatever negative_sampling says."""
    config = GSASRecExperimentConfig(loss=loss, negative_sampling=negative_sampling)
    assert config.per_position_negatives is expected
