"""Data (dataset_utils.py): the split byte for byte, the split files, the sequence store and its windows, length
groups, and which users and windows a training batch holds."""
import numpy as np
import pytest
import torch

from benchmarks.common import synthetic_dataset
from config import GSASRecError, GSASRecExperimentConfig
from dataset_utils import (SPLIT_FILES, DatasetSplit, InteractionWeightedSampler, Sequences, dataset_recipe,
                           length_groups, load_dataset, offsets_from_lengths, read_sequences, sequences_from_pairs,
                           sha256_of, split_sequences, training_batch)
from tests.conftest import write_synthetic_dataset


ML1M = dataset_recipe("ml1m")


EXPECTED_SPLIT_SHA256 = {
    "train/input.txt": "06957b3d3cc937ac05e5f5ade2d2d5c1042efdd2b6779b768140e74d4f6b20e3",
    "val/input.txt": "e4503bcef51a7689c48d491bd0dc090f053b8103b2c2bf6eed3bc31699fa09ca",
    "val/output.txt": "bb290f4a647533bef0f74cfaa6e74260d6e461da4fda072b9aaa6231c86240df",
    "test/input.txt": "c2aa5664407b04fb85d811e71696a9374da5e1db4e9fabfc19ca105a3fb51a5f",
    "test/output.txt": "6c9b242c789691b9680374d87a0fee61d6b473b99bed8439e4262a307c98d4ba",
}


def test_ml1m_split_is_byte_identical_to_the_official_one(ml1m_source_path, tmp_path):
    directory = ML1M.prepare(ml1m_source_path, tmp_path / "ml1m")
    assert {name: sha256_of(directory / name) for name in SPLIT_FILES} == EXPECTED_SPLIT_SHA256
    dataset = load_dataset(directory)
    assert (len(dataset.train), len(dataset.val_input), len(dataset.test_input)) == (6040, 512, 6040)
    assert dataset.num_items == 3416


def test_missing_and_wrong_source_files_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("GSASREC_ML1M_SOURCE", raising=False)
    with pytest.raises(GSASRecError, match="not found.*--source"):
        ML1M.find_source(str(tmp_path / "absent.txt"))
    truncated = tmp_path / "ml-1m.txt"
    truncated.write_text("1 1\n1 2\n")
    with pytest.raises(GSASRecError, match=f"expected {ML1M.SHA256}"):
        ML1M.find_source(str(truncated))
    monkeypatch.setenv("GSASREC_ML1M_SOURCE", str(truncated))
    with pytest.raises(GSASRecError, match="wrong or truncated"):
        ML1M.find_source()


def test_events_group_by_user_in_order_of_first_appearance():
    users = np.array([7, 7, 3, 7, 3, 9])
    items = np.array([1, 2, 3, 4, 5, 6])
    user_ids, sequences = sequences_from_pairs(users, items)
    assert user_ids.tolist() == [7, 3, 9]
    assert [sequences.items[a:b].tolist() for a, b in zip(sequences.offsets[:-1], sequences.offsets[1:])] == \
        [[1, 2, 4], [3, 5], [6]]


def test_leave_one_out_split_by_hand():
    sequences = Sequences(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=np.int32), np.array([0, 5, 9]))
    split = split_sequences(sequences, np.array([True, False]))
    rows = lambda s: [s.items[a:b].tolist() for a, b in zip(s.offsets[:-1], s.offsets[1:])]  # noqa: E731
    assert rows(split["train/input.txt"]) == [[1, 2], [6, 7]]
    assert rows(split["val/input.txt"]) == [[1, 2, 3]]
    assert split["val/output.txt"].tolist() == [4]
    assert rows(split["test/input.txt"]) == [[1, 2, 3, 4], [6, 7, 8]]
    assert split["test/output.txt"].tolist() == [5, 9]


@pytest.mark.parametrize("of_prefixes", [False, True])
def test_windows_are_the_left_padded_tails_of_sequences_or_prefixes(of_prefixes):
    rng = np.random.RandomState(0)
    lengths = rng.randint(0, 12, 30)
    offsets = offsets_from_lengths(lengths)
    sequences = Sequences(rng.randint(1, 50, offsets[-1]).astype(np.int32), offsets)
    rows = rng.permutation(30)[:17]
    kept = rng.randint(0, lengths[rows] + 1) if of_prefixes else lengths[rows]
    windows = sequences.windows(rows, 8, padding_id=51, prefix_lengths=kept if of_prefixes else None)
    for window, row, count in zip(windows, rows, kept):
        tail = sequences.items[offsets[row]:offsets[row] + count][-8:].tolist()
        assert window.tolist() == [51] * (8 - len(tail)) + tail


def test_out_of_range_item_ids_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("1 2 3\n4 5\n6 99 7\n")
    with pytest.raises(GSASRecError, match=r"input.txt, line 3: item id 99 is outside 1..10"):
        read_sequences(path, num_items=10)
    path.write_text("1 2\n3 x\n")
    with pytest.raises(GSASRecError, match="integer item ids"):
        read_sequences(path, num_items=10)


def test_empty_lines_are_empty_sequences(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("1 2\n\n3\n")
    sequences = read_sequences(path, num_items=5)
    assert sequences.lengths.tolist() == [2, 0, 1]


def test_split_files_with_disagreeing_line_counts_are_rejected(tmp_path):
    directory = write_synthetic_dataset(tmp_path / "synthetic")
    targets = directory / "test" / "output.txt"
    targets.write_text("".join(targets.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(GSASRecError, match="test: input.txt has 300 lines but output.txt has 299"):
        load_dataset(directory)


def test_the_synthetic_benchmark_dataset_has_the_asked_size_and_zipf_like_popularity():
    """benchmarks/ --synthetic: the asked numbers of users and items, ML-1M's split scheme, and item r drawn about
    r times less often than item 1."""
    dataset = synthetic_dataset(num_users=300, num_items=5000, seed=1)
    assert (len(dataset.test_target), len(dataset.val_target), dataset.num_items) == (300, 30, 5000)
    events = np.concatenate([dataset.train.items, dataset.test_target])
    assert events.min() >= 1 and events.max() <= 5000
    counts = np.bincount(events, minlength=5001)
    assert 1.7 < counts[1] / counts[2] < 2.3 and 7 < counts[1] / counts[10] < 13


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
