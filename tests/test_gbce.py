from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.paper_way import explicit_gbce, paper_way_loss
from config import GSASRecExperimentConfig
from dataset_utils import DatasetSplit, Sequences, length_groups, offsets_from_lengths
from gsasrec import GSASRec, gamma_transform, gbce_alpha, gbce_beta, gbce_loss
import train_gsasrec
from train_gsasrec import InteractionWeightedSampler, training_batch, training_loss



@pytest.mark.parametrize("k", [1, 16, 256])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.75, 1.0])
def test_loss_equals_the_explicit_formula(k, t):
    generator = torch.Generator().manual_seed(k * 10 + int(t * 4))
    positive = torch.randn(300, generator=generator) * 3
    negative = torch.randn(300, k, generator=generator) * 3
    beta = gbce_beta(k, 3416, t)
    fast = gbce_loss(positive, negative, beta)
    assert fast.dtype == torch.float32
    assert fast.item() == pytest.approx(explicit_gbce(positive, negative, beta).item(), rel=1e-5)
    transformed = torch.cat([gamma_transform(positive.double(), beta)[:, None], negative.double()], dim=1)
    labels = torch.cat([torch.ones(300, 1), torch.zeros(300, k)], dim=1).double()
    assert fast.item() == pytest.approx(F.binary_cross_entropy_with_logits(transformed, labels).item(), rel=1e-5)


def test_beta_for_ml1m_and_its_limits():
    assert gbce_beta(256, 3416, 0.75) == pytest.approx(0.30622, abs=1e-5)
    assert gbce_beta(256, 3416, 0.0) == pytest.approx(1.0)
    assert gbce_beta(256, 3416, 1.0) == pytest.approx(gbce_alpha(256, 3416)) == pytest.approx(256 / 3415)


def test_t_zero_is_plain_bce():
    positive, negative = torch.randn(50), torch.randn(50, 8)
    scores = torch.cat([positive[:, None], negative], dim=1)
    labels = torch.cat([torch.ones(50, 1), torch.zeros(50, 8)], dim=1)
    assert gbce_loss(positive, negative, gbce_beta(8, 100, 0.0)).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(scores, labels).item(), rel=1e-6)


def test_extreme_scores_stay_finite():
    scores = torch.tensor([-50.0, -10.0, 0.0, 10.0, 50.0], requires_grad=True)
    beta = gbce_beta(256, 3416, 0.75)
    gamma = gamma_transform(scores, beta)
    loss = gbce_loss(scores, scores[:, None].expand(5, 3), beta)
    (loss + gamma.sum()).backward()
    assert torch.isfinite(gamma).all() and torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    assert gamma.detach().double() == pytest.approx(gamma_transform(scores.detach().double(), beta), rel=1e-4)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("negative_sampling", ["per_position", "per_sequence"])
@pytest.mark.parametrize("k", [1, 7, 40])
@pytest.mark.parametrize("sparse", [False, True])
def test_fast_training_loss_equals_the_papers_way(negative_sampling, k, sparse, device, monkeypatch):
    """Same sampled negatives: gathered per-position embeddings and the explicit formula, one padded pass.
    Over 200 items, k = 1 takes the gathering path of per-position sampling (here in chunks of 3 rows) and
    k = 7, 40 the catalogue one. On a GPU the whole batch goes through in one group, on a CPU in many length
    groups. With sparse item gradients the tables' gradients are the same, as sparse tensors."""
    monkeypatch.setattr(train_gsasrec, "CPU_GROUP_PADDING", 8)
    monkeypatch.setattr(train_gsasrec, "GATHERED_NUMBERS_PER_CHUNK", 50)
    num_items = 200
    config = GSASRecExperimentConfig(sequence_length=12, embedding_dim=16, num_heads=2, num_blocks=2,
                                     negs_per_pos=k, gbce_t=0.5, negative_sampling=negative_sampling)
    torch.manual_seed(0)
    model = GSASRec(num_items, 12, 16, 2, 2, embedding_init_std=0.3, sparse_item_gradients=sparse).eval().to(device)
    rng = np.random.RandomState(0)
    lengths = rng.randint(2, 14, 70)
    batch = torch.full((70, 13), num_items + 1)
    for row, length in enumerate(lengths):
        batch[row, 13 - length:] = torch.from_numpy(rng.randint(1, num_items + 1, length))
    batch = batch.to(device)
    beta = gbce_beta(k, num_items, 0.5)
    fast = training_loss(model, batch, config, beta, torch.Generator(device).manual_seed(5))

    generator = torch.Generator(device).manual_seed(5)
    is_target = batch[:, :-1] != num_items + 1
    if negative_sampling == "per_sequence":
        negatives = torch.randint(1, num_items + 1, (70, k), generator=generator, device=device)
        negatives = negatives[:, None, :].expand(70, 12, k)
    else:
        # One draw of k per target, in row-major order of the targets; padded positions get item 1 (unused).
        negatives = torch.ones(70, 12, k, dtype=torch.int64, device=device)
        negatives[is_target] = torch.randint(1, num_items + 1, (int(is_target.sum()), k), generator=generator,
                                             device=device)
    reference = paper_way_loss(model, batch, negatives, beta)
    assert fast.item() == pytest.approx(reference.item(), rel=1e-5)
    # The same gradients too: the catalogue path has a backward of its own.
    gradients = []
    for loss in (fast, reference):
        model.zero_grad()
        loss.backward()
        gradients.append({name: parameter.grad.to_dense() for name, parameter in model.named_parameters()})
        assert model.output_embedding.weight.grad.is_sparse == (sparse and loss is fast)
    for name, gradient in gradients[1].items():
        assert (gradients[0][name] - gradient).norm() <= 1e-5 * gradient.norm() + 1e-8, name  # key biases: 0


def test_length_groups_cover_every_row_and_stop_at_the_padding_budget():
    lengths = np.random.RandomState(0).randint(2, 202, 500)
    groups = length_groups(lengths, max_padding=256)
    assert sorted(np.concatenate(groups).tolist()) == list(range(500))

    def padding(rows: np.ndarray) -> int:
        return int(lengths[rows].max() * len(rows) - lengths[rows].sum())

    assert all(padding(group) <= 256 for group in groups)
    # Each group stops because the next longer row would take it over the budget.
    assert all(padding(np.concatenate([group, following[:1]])) > 256 for group, following in zip(groups, groups[1:]))
    assert all(lengths[group].max() <= lengths[following].min() for group, following in zip(groups, groups[1:]))
    assert 10 < len(groups) < 100


def test_length_groups_stop_at_a_row_count_and_a_position_count():
    """Evaluation's batches: at most max_rows rows and max_positions positions (rows times the longest), each
    group as large as those bounds let it be."""
    lengths = np.random.RandomState(1).randint(0, 200, 1000)
    groups = length_groups(lengths, max_rows=64, max_positions=3200)
    assert sorted(np.concatenate(groups).tolist()) == list(range(1000))
    assert all(len(group) <= 64 and len(group) * lengths[group].max() <= 3200 for group in groups)
    for group, following in zip(groups, groups[1:]):
        grown = np.concatenate([group, following[:1]])
        assert len(grown) > 64 or len(grown) * lengths[grown].max() > 3200


def test_random_training_windows_are_full_slices_ending_anywhere_after_the_first_full_window():
    lengths = np.array([3, 7, 12, 40])
    offsets = offsets_from_lengths(lengths)
    train = Sequences(np.arange(1, offsets[-1] + 1, dtype=np.int32), offsets)  # item = its flat position + 1
    dataset = DatasetSplit(train, train, lengths, train, lengths, num_items=int(offsets[-1]))
    rows = np.arange(4)
    generator = torch.Generator().manual_seed(0)
    latest = training_batch(dataset, rows, GSASRecExperimentConfig(sequence_length=6), generator)
    assert latest[3].tolist() == list(range(offsets[4] - 6, offsets[4] + 1))
    config = GSASRecExperimentConfig(sequence_length=6, training_window="random")
    ends = {row: set() for row in rows}
    for _ in range(200):
        batch = training_batch(dataset, rows, config, generator)
        assert batch.shape == (4, 7)
        assert batch[0].tolist() == [dataset.padding_id] * 4 + [1, 2, 3]  # shorter than a window: all of it
        for row in rows[1:]:
            window = batch[row].tolist()
            assert window == list(range(window[0], window[0] + 7))  # 7 consecutive items of the row
            ends[row].add(window[-1] - offsets[row])
    assert ends[1] == {7} and ends[2] == set(range(7, 13)) and ends[3] == set(range(7, 41))


def test_per_interaction_sampling_draws_users_by_their_windows_worth_of_targets():
    """A history of 41 items holds 40 targets, 4 windows' worth of a window of 11 (10 targets): it is drawn 4 times
    as often as any history that fits in one window, so each of its interactions is a target as often."""
    lengths = np.array([2, 5, 11, 41])
    sampler = InteractionWeightedSampler(lengths, window=11, num_replicas=1, rank=0, seed=3)
    counts = np.zeros(4)
    for epoch in range(2000):
        sampler.set_epoch(epoch)
        draw = list(sampler)
        assert len(draw) == len(sampler) == 4
        counts += np.bincount(draw, minlength=4)
    assert counts / counts.sum() == pytest.approx([1 / 7, 1 / 7, 1 / 7, 4 / 7], abs=0.02)


def test_per_interaction_sampling_repeats_an_epoch_and_gives_each_rank_its_own_users():
    lengths = np.random.RandomState(0).randint(2, 500, 101)
    ranks = [InteractionWeightedSampler(lengths, 201, num_replicas=2, rank=rank, seed=5) for rank in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(7)
    shares = [list(sampler) for sampler in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == 51
    assert shares[0] != shares[1]
    assert list(ranks[0]) == shares[0]  # the same epoch draws the same users again, as a resumed run needs
    ranks[0].set_epoch(8)
    assert list(ranks[0]) != shares[0]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_bf16_autocast_only_where_the_hardware_has_it(monkeypatch, native_bf16):
    """bf16=True autocasts where bf16 is native; where it would be emulated (10x slower) the loss is float32's."""
    monkeypatch.setattr(train_gsasrec, "has_native_bf16", lambda device: native_bf16)
    config = GSASRecExperimentConfig(sequence_length=12, embedding_dim=16, num_heads=2, num_blocks=2, negs_per_pos=4)
    torch.manual_seed(0)
    model = GSASRec(50, 12, 16, 2, 2, embedding_init_std=0.3).eval()
    batch = torch.randint(1, 51, (8, 13))
    beta = gbce_beta(4, 50, config.gbce_t)
    losses = [training_loss(model, batch, replace(config, bf16=bf16), beta, torch.Generator().manual_seed(1)).item()
              for bf16 in (False, True)]
    assert (losses[0] != losses[1]) == native_bf16


@pytest.mark.parametrize("native_bf16", [True, False])
def test_bf16_catalogue_scores_agree_with_float32_and_only_where_native(monkeypatch, native_bf16):
    """bf16_scores=True runs the per-position catalogue product in bf16 where bf16 is native: loss and gradients
    within 1% of float32's; elsewhere the loss is float32's to the bit. 600 targets span several blocks."""
    monkeypatch.setattr(train_gsasrec, "has_native_bf16", lambda device: native_bf16)
    config = GSASRecExperimentConfig(sequence_length=30, embedding_dim=16, num_heads=2, num_blocks=1, negs_per_pos=40,
                                     negative_sampling="per_position")
    torch.manual_seed(0)
    model = GSASRec(300, 30, 16, 2, 1, embedding_init_std=0.3).eval()
    batch = torch.randint(1, 301, (20, 31))
    beta = gbce_beta(40, 300, config.gbce_t)
    results = []
    for bf16_scores in (False, True):
        model.zero_grad()
        loss = training_loss(model, batch, replace(config, bf16_scores=bf16_scores), beta,
                             torch.Generator().manual_seed(1))
        loss.backward()
        results.append((loss.item(), model.output_item_embeddings.grad.clone()))
    (loss32, grad32), (loss16, grad16) = results
    if native_bf16:
        assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=1e-2)
        assert (grad16 - grad32).norm() / grad32.norm() < 1e-2
    else:
        assert loss16 == loss32 and torch.equal(grad16, grad32)
