"""Checkpoints of the official port (bare state dicts under its parameter names) load, score and convert both ways."""
import json
from dataclasses import replace

import pytest
import torch

from config import GSASRecError
from utils import atomic_save, build_model, load_model, model_checkpoint, read_checkpoint, rename_parameters
from tests.conftest import run_script, tiny_config, write_config

# The official port's parameter names for two blocks, as REFERENCE.md documents them.
DOCUMENTED = {"item_embedding.weight", "position_embedding.weight", "output_embedding.weight", "seq_norm.weight",
              "seq_norm.bias"} | {f"transformer_blocks.{block}.{module}.{parameter}" for block in (0, 1)
                                  for module in ("first_norm", "multihead_attention.query_proj",
                                                 "multihead_attention.key_proj", "multihead_attention.val_proj",
                                                 "second_norm", "dense1", "dense2")
                                  for parameter in ("weight", "bias")}


@pytest.fixture
def trained_weights(synthetic_datasets_dir, tmp_path):
    """A tiny two-block model's checkpoint in our format and the same weights in the official one."""
    config = tiny_config(num_blocks=2)
    torch.manual_seed(0)
    model = build_model(config, 40)
    ours = tmp_path / "ours.pt"
    atomic_save(model_checkpoint(model, config), ours)
    official = tmp_path / "official.pt"
    torch.save(rename_parameters(model.state_dict(), to_official=True), official)
    return config, ours, official, write_config(tmp_path / "config_tiny.py", num_blocks=2)


def test_official_names_are_the_documented_ones_and_round_trip(trained_weights):
    config, ours, official, _ = trained_weights
    state = read_checkpoint(str(ours))["model_state"]
    assert set(rename_parameters(state, to_official=True)) == DOCUMENTED
    back = read_checkpoint(str(official), config)["model_state"]
    assert list(back) == list(state) and all(torch.equal(back[name], state[name]) for name in state)


def test_an_official_checkpoint_evaluates_to_the_metrics_of_the_same_weights(trained_weights, tmp_path):
    _, ours, official, config_file = trained_weights
    results = {}
    for name, path, extra in (("ours", ours, []), ("official", official, [f"--config={config_file}"])):
        output = tmp_path / f"{name}.json"
        result = run_script("evaluate_gsasrec.py", str(path), *extra, "--device", "cpu", "--calibration",
                            "--output", str(output))
        assert result.returncode == 0, result.stderr
        results[name] = json.loads(output.read_text())
    assert results["official"]["metrics"] == results["ours"]["metrics"]
    assert results["official"]["calibration"] == results["ours"]["calibration"]


def test_written_official_checkpoint_is_a_bare_state_dict_of_the_same_tensors(trained_weights, tmp_path):
    _, ours, _, _ = trained_weights
    written = tmp_path / "written.pt"
    result = run_script("evaluate_gsasrec.py", str(ours), "--write-official", str(written))
    assert result.returncode == 0, result.stderr
    state = torch.load(written, weights_only=True)
    expected = rename_parameters(read_checkpoint(str(ours))["model_state"], to_official=True)
    assert list(state) == list(expected) and all(torch.equal(state[name], expected[name]) for name in state)


@pytest.mark.parametrize("change, message", [
    (None, "official-port checkpoint .* give its config"),
    ({"num_blocks": 3}, "missing transformer_blocks.2."),
    ({"num_blocks": 1}, "unexpected transformer_blocks.1."),
    ({"reuse_item_embeddings": True}, "unexpected output_embedding.weight"),
    ({"embedding_dim": 64}, r"item_embedding.weight is \(42, 32\) in the checkpoint, \(42, 64\)"),
    ({"sequence_length": 20}, r"position_embedding.weight is \(16, 32\)"),
])
def test_an_official_checkpoint_that_does_not_fit_its_config_is_named(trained_weights, change, message):
    config, _, official, _ = trained_weights
    with pytest.raises(GSASRecError, match=message):
        load_model(str(official), "cpu", None if change is None else replace(config, **change))


def test_an_official_checkpoint_for_another_item_count_is_refused_in_one_line(trained_weights, tmp_path):
    _, _, official, config_file = trained_weights
    state = torch.load(official, weights_only=True)
    for name in ("item_embedding.weight", "output_embedding.weight"):
        state[name] = torch.cat([state[name], state[name][:1]])
    torch.save(state, tmp_path / "bigger.pt")
    result = run_script("evaluate_gsasrec.py", str(tmp_path / "bigger.pt"), f"--config={config_file}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'bigger.pt'} was trained on 41 items but the dataset has 40"]


def test_a_ligr_checkpoint_loads_and_is_refused_in_the_official_format(tmp_path):
    """A LiGR model's checkpoint rebuilds the same network; the official port has no such block, so writing its
    format stops with one line and writes nothing."""
    config = replace(tiny_config(num_blocks=2), block="ligr", ligr_feed_forward_multiplier=2)
    torch.manual_seed(0)
    model = build_model(config, 40).eval()
    ours = tmp_path / "ligr.pt"
    atomic_save(model_checkpoint(model, config), ours)
    loaded, loaded_config = load_model(str(ours), device="cpu")
    input = torch.randint(1, 41, (3, config.sequence_length))
    assert loaded_config.block == "ligr" and torch.equal(loaded(input), model(input))
    written = tmp_path / "written.pt"
    result = run_script("evaluate_gsasrec.py", str(ours), "--write-official", str(written))
    assert result.returncode == 2 and not written.exists()
    assert result.stderr.strip() == "error: the official port has SASRec blocks only; this checkpoint's are 'ligr'"
