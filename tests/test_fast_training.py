"""The fast training engine (fast_training.py) against the plain reference of train_gsasrec.reference_loss: the same
loss, gradients and Adam updates through every path (length groups, gathered and catalogue scores, bags, tables
stepped in backward, sparse updates, bf16 products where native), and its cheap dropout masks."""
from dataclasses import replace

import numpy as np
import pytest
import torch

import fast_training
from config import GSASRecExperimentConfig
from dataset_utils import dataset_directory, load_dataset, training_batch
from eval_utils import has_native_bf16
from fast_training import BitFieldDropout, TableSteps, training_loss
from gsasrec import GSASRec, gbce_beta
from tests.conftest import small_config
from tests.references import random_batch
from train_gsasrec import build_optimizer, reference_loss, sample_negatives
from utils import build_model

NUM_ITEMS, LENGTH = 200, 12
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
# loss, negative_sampling, k, logq_correction, scoring_path (how per-position negatives are scored)
CASES = [("gbce", "per_position", 1, False, "gathered"), ("gbce", "per_position", 7, False, "catalogue"),
         ("gbce", "per_position", 7, False, "gathered"), ("gbce", "per_position", 40, False, "catalogue"),
         ("gbce", "per_position", 40, False, "gathered"), ("gbce", "per_sequence", 7, False, "gathered"),
         ("softmax", "per_position", 1, False, "gathered"), ("sampled_softmax", "per_position", 7, True, "catalogue"),
         ("sampled_softmax", "per_position", 1, True, "gathered"),
         ("sampled_softmax", "per_sequence", 16, False, "gathered")]


def fast_loss(model: GSASRec, batch: torch.Tensor, config: GSASRecExperimentConfig, beta: float, seed: int,
              table_steps: TableSteps = TableSteps(), scoring_path: str = "gathered") -> torch.Tensor:
    """fast_training.training_loss on the negatives train_gsasrec draws with a generator seeded with `seed`."""
    negatives = sample_negatives(batch, config, model.num_items, torch.Generator().manual_seed(seed))
    return training_loss(model, batch, negatives, config, beta, table_steps, scoring_path)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", ["sasrec", "ligr"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("loss, negative_sampling, k, logq_correction, scoring_path", CASES)
def test_the_fast_loss_and_gradients_equal_the_reference(loss, negative_sampling, k, logq_correction, scoring_path,
                                                         sparse, block, device, monkeypatch):
    """Same negatives, same loss and gradients: on a CPU through many length groups, catalogue products in blocks of
    32 rows and gathered rows in chunks of 3; on a GPU in one group. With sparse item gradients the tables' gradients
    are the same, as sparse tensors."""
    monkeypatch.setattr(fast_training, "CPU_GROUP_PADDING", 8)
    monkeypatch.setattr(fast_training, "CATALOGUE_BLOCK_ROWS", 32)
    monkeypatch.setattr(fast_training, "GATHERED_NUMBERS_PER_CHUNK", 50)
    config = GSASRecExperimentConfig(sequence_length=LENGTH, embedding_dim=16, num_heads=2, num_blocks=2,
                                     negs_per_pos=k, gbce_t=0.5, loss=loss, negative_sampling=negative_sampling,
                                     logq_correction=logq_correction, block=block)
    torch.manual_seed(0)
    model = GSASRec(NUM_ITEMS, LENGTH, 16, 2, 2, embedding_init_std=0.3, sparse_item_gradients=sparse,
                    block=block).eval().to(device)
    batch = random_batch(NUM_ITEMS, LENGTH).to(device)
    negatives = sample_negatives(batch, config, NUM_ITEMS, torch.Generator(device).manual_seed(5))
    beta = gbce_beta(k, NUM_ITEMS, 0.5)
    fast, reference = (training_loss(model, batch, negatives, config, beta, scoring_path=scoring_path),
                       reference_loss(model, batch, negatives, config, beta))
    assert fast.item() == pytest.approx(reference.item(), rel=1e-5)
    gradients = []
    for value in (fast, reference):
        model.zero_grad()
        value.backward()
        gradients.append({name: parameter.grad.to_dense() for name, parameter in model.named_parameters()})
        assert model.output_embedding.weight.grad.is_sparse == (sparse and value is fast)
    for name, gradient in gradients[1].items():
        assert (gradients[0][name] - gradient).norm() <= 1e-5 * gradient.norm() + 1e-8, name  # key biases: 0


@pytest.mark.parametrize("native_bf16", [True, False])
def test_bf16_autocast_only_where_the_hardware_has_it(monkeypatch, native_bf16):
    """bf16=True autocasts where bf16 is native; where it would be emulated (10x slower) the loss is float32's."""
    monkeypatch.setattr(fast_training, "has_native_bf16", lambda device: native_bf16)
    config = GSASRecExperimentConfig(sequence_length=12, embedding_dim=16, num_heads=2, num_blocks=2, negs_per_pos=4)
    torch.manual_seed(0)
    model = GSASRec(50, 12, 16, 2, 2, embedding_init_std=0.3).eval()
    batch = torch.randint(1, 51, (8, 13))
    beta = gbce_beta(4, 50, config.gbce_t)
    losses = [fast_loss(model, batch, replace(config, bf16=bf16), beta, seed=1).item()
              for bf16 in (False, True)]
    assert (losses[0] != losses[1]) == native_bf16


@pytest.mark.parametrize("native_bf16", [True, False])
def test_bf16_catalogue_scores_agree_with_float32_and_only_where_native(monkeypatch, native_bf16):
    """bf16_scores=True runs the per-position catalogue product in bf16 where bf16 is native: loss and gradients
    within 1% of float32's; elsewhere the loss is float32's to the bit. 600 targets span several blocks."""
    monkeypatch.setattr(fast_training, "has_native_bf16", lambda device: native_bf16)
    config = GSASRecExperimentConfig(sequence_length=30, embedding_dim=16, num_heads=2, num_blocks=1, negs_per_pos=40,
                                     negative_sampling="per_position")
    torch.manual_seed(0)
    model = GSASRec(300, 30, 16, 2, 1, embedding_init_std=0.3).eval()
    batch = torch.randint(1, 301, (20, 31))
    beta = gbce_beta(40, 300, config.gbce_t)
    results = []
    for bf16_scores in (False, True):
        model.zero_grad()
        loss = fast_loss(model, batch, replace(config, bf16_scores=bf16_scores), beta, seed=1, scoring_path="catalogue")
        loss.backward()
        results.append((loss.item(), model.output_item_embeddings.grad.clone()))
    (loss32, grad32), (loss16, grad16) = results
    if native_bf16:
        assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=1e-2)
        assert (grad16 - grad32).norm() / grad32.norm() < 1e-2
    else:
        assert loss16 == loss32 and torch.equal(grad16, grad32)


def test_the_log_q_correction_changes_the_sampled_loss():
    """Without the correction the k sampled negatives stand for themselves, with it for N / k items each."""
    model = GSASRec(NUM_ITEMS, LENGTH, 16, 2, 2, embedding_init_std=0.3).eval()
    batch = random_batch(NUM_ITEMS, LENGTH)
    losses = [fast_loss(model, batch, GSASRecExperimentConfig(
        sequence_length=LENGTH, embedding_dim=16, num_heads=2, num_blocks=2, negs_per_pos=7, loss="sampled_softmax",
        logq_correction=correction), 1.0, seed=5).item() for correction in (False, True)]
    assert losses[1] > losses[0] + 1.0


@pytest.mark.skipif(not has_native_bf16(torch.device("cpu")), reason="no native bf16 on this CPU")
def test_bf16_catalogue_normalisers_stay_close_to_float32():
    """bf16_scores runs the softmax's catalogue products in bf16: loss and gradients within 1% of float32's."""
    model = GSASRec(NUM_ITEMS, LENGTH, 16, 2, 2, embedding_init_std=0.3).eval()
    batch = random_batch(NUM_ITEMS, LENGTH)
    results = []
    for bf16_scores in (False, True):
        config = GSASRecExperimentConfig(sequence_length=LENGTH, embedding_dim=16, num_heads=2, num_blocks=2,
                                         loss="softmax", bf16_scores=bf16_scores)
        model.zero_grad()
        loss = fast_loss(model, batch, config, 1.0, seed=1)
        loss.backward()
        results.append((loss.item(), model.output_embedding.weight.grad.clone()))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert (grad16 - grad32).norm() <= 1e-2 * grad32.norm()


@pytest.mark.parametrize("in_backward, block_rows, gathered", [(True, 7, True), (True, 8192, True), (True, 7, False),
                                                               (False, 8192, True)])
def test_the_item_tables_take_adams_updates_and_in_backward_no_gradient(synthetic_datasets_dir, monkeypatch,
                                                                       in_backward, block_rows, gathered):
    """The tables' own Adam, stepped in backward block by block of rows or after it, moves every parameter exactly
    as one Adam over the model does. In backward, the input table never holds a gradient, nor does the output table
    where its negatives are gathered; scored over the catalogue, its gradient is made whole and stepped after."""
    monkeypatch.setattr(fast_training, "TABLE_STEP_BLOCK_ROWS", block_rows)
    dataset = load_dataset(dataset_directory("successor"))
    config = small_config(negative_sampling="per_position")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(config, dataset.num_items))
    optimizers = (torch.optim.Adam(models[0].parameters(), lr=config.learning_rate, fused=True),
                  build_optimizer(models[1], config, in_backward=in_backward))
    tables = (models[1].item_embedding.weight, models[1].output_embedding.weight)
    table_gradients = []
    for step in range(3):
        batch = training_batch(dataset, np.arange(4 * step, 4 * step + 4), config, torch.Generator())
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same dropout masks for both
            steps = optimizer.table_steps if model is models[1] else TableSteps()
            fast_loss(model, batch, config, 0.5, step, steps, "gathered" if gathered else "catalogue").backward()
            if model is models[1]:
                table_gradients.append([table.grad is not None for table in tables])
            optimizer.step()
    assert table_gradients == [[not in_backward, not (in_backward and gathered)]] * 3
    for name, value in models[0].state_dict().items():
        assert torch.equal(value, models[1].state_dict()[name]), name


@pytest.mark.parametrize("reuse_item_embeddings", [False, True])
def test_sparse_item_updates_are_adam_on_the_touched_rows_and_leave_the_others(synthetic_datasets_dir,
                                                                             reuse_item_embeddings):
    """sparse_item_updates: the item tables' gradients are sparse, and the optimiser moves exactly the rows a step
    touched. From equal weights, the first step equals Adam's everywhere (no moments yet); in the second, Adam
    also moves the rows only the first step touched (momentum), the lazy update leaves them, and every row the
    second step touched moves by the same amount in both (each row's moments saw the same two gradients)."""
    dataset = load_dataset(dataset_directory("successor"))
    models, optimizers = [], []
    for sparse in (False, True):
        config = small_config(sparse_item_updates=sparse, reuse_item_embeddings=reuse_item_embeddings,
                              negative_sampling="per_position")
        torch.manual_seed(0)
        models.append(build_model(config, dataset.num_items))
        optimizers.append(build_optimizer(models[-1], config, in_backward=True))
        for group in optimizers[-1].param_groups:
            group["eps"] = 1e-20  # SparseAdam adds eps before the bias correction, Adam after: make it vanish
    assert isinstance(optimizers[1].parts[1], torch.optim.SparseAdam)
    beta = 0.5
    touched = []
    for step, rows in enumerate((np.arange(0, 4), np.arange(4, 8))):
        batch = training_batch(dataset, rows, small_config(), torch.Generator())
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same dropout masks for both
            # Few negatives per sequence, so each step leaves some rows untouched.
            fast_loss(model, batch, small_config(negative_sampling="per_sequence"), beta, step).backward()
            table = model.output_item_embeddings
            assert table.grad.is_sparse == model.item_embedding.sparse
            if table.grad.is_sparse:
                touched.append(set(table.grad.coalesce().indices()[0].tolist()))
            optimizer.step()
        dense, lazy = (model.output_item_embeddings.detach() for model in models)
        if step == 0:
            before_second = [table.clone() for table in (dense, lazy)]
            for name, value in models[0].state_dict().items():
                assert torch.allclose(value, models[1].state_dict()[name], atol=1e-7), name
    first_only = sorted(touched[0] - touched[1])
    second = sorted(touched[1])
    assert first_only and second
    moved = lambda table, before: (table - before).abs().amax(1)  # noqa: E731
    assert (moved(dense, before_second[0])[first_only] > 0).all()
    assert (moved(lazy, before_second[1])[first_only] == 0).all()
    assert torch.allclose(dense[second], lazy[second], atol=1e-6)


def test_sampled_products_are_each_rows_dot_products_with_repeats_and_any_order():
    """The CPU's sampled sparse product scores every (row, column) pair as a gather and dot product does, with
    columns repeated within a row and in no order: the CSR invariants it does not check are not needed."""
    torch.manual_seed(0)
    hidden, table = torch.randn(300, 16), torch.randn(40, 16)
    columns = torch.randint(0, 40, (300, 30))
    assert (columns[:, 1:] < columns[:, :-1]).any() and (columns.sort(1).values.diff(dim=1) == 0).any()
    expected = (table[columns] * hidden.unsqueeze(1)).sum(-1)
    assert torch.allclose(fast_training.sampled_products(hidden, table, columns), expected, atol=1e-5)


def trial_run(monkeypatch, step_seconds: dict[str, list[float]], targets: dict[str, int]):
    """A ScoringPathTrial("auto") over steps that take step_seconds[path][i] seconds (the warm-up 1 s) and score
    targets[path] targets, the paths alternating from catalogue after the warm-up: (the trial, the paths of its
    steps until it decides, that deciding step's included)."""
    now = [0.0]
    monkeypatch.setattr(fast_training.time, "perf_counter", lambda: now[0])
    trial, paths = fast_training.ScoringPathTrial("auto", 3416), []
    while trial.path is None:
        expected = "gathered" if len(paths) % 2 == 0 else "catalogue"
        paths.append(trial.next_path(targets[expected] if paths else 1))
        if trial.path is None:
            now[0] += 1.0 if len(paths) == 1 else step_seconds[paths[-1]][paths[1:].count(paths[-1]) - 1]
    return trial, paths


def test_the_scoring_trial_alternates_the_paths_then_keeps_the_fastest_per_target(monkeypatch):
    """After a warm-up step the paths alternate, TRIAL_STEPS_PER_PATH timed steps each; the fastest step per target
    decides and is kept: here catalogue's steps are shorter but score fewer targets. A fixed setting is used from the
    first step."""
    steps = fast_training.TRIAL_STEPS_PER_PATH
    trial, paths = trial_run(monkeypatch, {"gathered": [3.0] + [2.0] * (steps - 1), "catalogue": [1.9] * steps},
                             {"gathered": 100, "catalogue": 90})
    assert paths[:-1] == ["gathered"] + ["catalogue", "gathered"] * steps and paths[-1] == "gathered" == trial.path
    assert trial.microseconds_per_target() == {"gathered": 20000.0, "catalogue": round(1.9 / 90 * 1e6, 2)}
    assert [trial.next_path(10) for _ in range(3)] == ["gathered"] * 3
    assert fast_training.ScoringPathTrial("catalogue", 3416).next_path(10) == "catalogue"


def test_a_catalogue_too_large_for_its_product_is_not_tried():
    """Past TRIAL_MAX_CATALOGUE_ITEMS a block of catalogue scores would take gigabytes: gathered from the first step,
    unless the catalogue way is asked for."""
    largest = fast_training.TRIAL_MAX_CATALOGUE_ITEMS
    assert fast_training.ScoringPathTrial("auto", largest).path is None
    assert fast_training.ScoringPathTrial("auto", largest + 1).next_path(10) == "gathered"
    assert fast_training.ScoringPathTrial("catalogue", largest + 1).next_path(10) == "catalogue"


def test_a_path_many_times_slower_loses_the_trial_at_once(monkeypatch):
    """A catalogue step TRIAL_CLEAR_FACTOR times a gathered one's (a million items) is run once, not five times."""
    trial, paths = trial_run(monkeypatch, {"gathered": [1.0] * 5, "catalogue": [50.0] * 5},
                             {"gathered": 100, "catalogue": 100})
    assert paths == ["gathered", "catalogue", "gathered", "gathered"] and trial.path == "gathered"


@pytest.mark.parametrize("rate,bits", [(0.5, 1), (0.25, 2), (0.75, 2), (0.0625, 4), (0.3, 16)])
def test_dropout_drops_at_the_rate_and_keeps_the_mean(rate, bits):
    dropout = BitFieldDropout(rate).train()
    assert dropout.bits == bits
    count = 400_003
    dropped = dropout(torch.ones(count)) == 0
    assert dropped.float().mean().item() == pytest.approx(rate, abs=0.005)
    assert dropout(torch.ones(count)).mean().item() == pytest.approx(1.0, abs=0.01)
    # Elements are dropped independently: neighbours, and the fields of one random byte (a byte count apart).
    random_bytes = -(-count * bits // 64) * 8
    for lag in [1] + ([random_bytes] if bits < 8 else []):
        both = (dropped[:-lag] & dropped[lag:]).float().mean().item()
        assert both == pytest.approx(rate ** 2, abs=0.005)
    assert torch.equal(dropout.eval()(torch.ones(10)), torch.ones(10))
