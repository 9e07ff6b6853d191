"""TokenLoader: windows, epochs, determinism, exact resume, rank sharding, evaluation."""
import json

import numpy as np
import pytest
import torch

from ltk.training.loader import TokenLoader
from ltk.training.shards import write_shard

BLOCK = 8
BASES = (0, 5000)  # shard i holds BASES[i], BASES[i] + 1, ...: a window that crossed shards would jump


@pytest.fixture
def files(tmp_path):
    a = write_shard(tmp_path / "a.bin", np.arange(BASES[0], BASES[0] + 403), vocab_size=10_000)  # 50 windows
    b = write_shard(tmp_path / "b.bin", np.arange(BASES[1], BASES[1] + 250), vocab_size=10_000)  # 31 windows
    return [a, b]


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def assert_same(batches, others):
    assert len(batches) == len(others)
    for (x1, y1), (x2, y2) in zip(batches, others):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_windows_are_shifted_pairs_inside_one_shard(files):
    loader = TokenLoader(files, BLOCK, batch_size=5)
    assert loader.num_windows == 50 + 31
    for x, y in take(loader, 30):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (5, BLOCK)
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.all(y[:, -1] == x[:, -1] + 1)
        assert torch.all(x[:, -1] - x[:, 0] == BLOCK - 1)  # consecutive tokens: no shard crossing
        base = torch.where(x[:, 0] >= BASES[1], BASES[1], BASES[0])
        assert torch.all((x[:, 0] - base) % BLOCK == 0)  # windows start every block_size tokens


def test_shards_too_short_for_a_window_are_passed_over(files, tmp_path):
    empty = write_shard(tmp_path / "e.bin", np.arange(3), vocab_size=10_000)
    loader = TokenLoader([files[0], empty, files[1]], BLOCK, batch_size=81)
    assert loader.num_windows == 81
    (x, _), = loader.eval_batches(1)
    assert x[49, 0] == 49 * BLOCK and x[50, 0] == BASES[1]  # window 50 is the second real shard's first


def test_an_epoch_visits_distinct_windows_and_skips_the_remainder(files):
    loader = TokenLoader(files, BLOCK, batch_size=4, world_size=1)
    assert loader.steps_per_epoch == 81 // 4
    starts = torch.cat([x[:, 0] for x, _ in take(loader, loader.steps_per_epoch)])
    assert len(set(starts.tolist())) == 80  # 80 distinct windows, 1 skipped
    assert loader.epoch == 0
    next_epoch = torch.cat([x[:, 0] for x, _ in take(loader, loader.steps_per_epoch)])
    assert loader.epoch == 1 and not torch.equal(starts, next_epoch)  # a new permutation


def test_same_seed_same_batches_other_seed_other_batches(files):
    assert_same(take(TokenLoader(files, BLOCK, 3, seed=7), 40), take(TokenLoader(files, BLOCK, 3, seed=7), 40))
    x7, _ = TokenLoader(files, BLOCK, 3, seed=7).next_batch()
    x8, _ = TokenLoader(files, BLOCK, 3, seed=8).next_batch()
    assert not torch.equal(x7, x8)


@pytest.mark.parametrize("k", [0, 5, 26, 27, 28])  # 27 steps per epoch: resume around the boundary
def test_resume_continues_bit_for_bit(files, k):
    reference = take(TokenLoader(files, BLOCK, 3, seed=1), k + 40)
    first = TokenLoader(files, BLOCK, 3, seed=1)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    resumed = TokenLoader(files, BLOCK, 3, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    assert_same(take(resumed, 40), reference[k:])


def test_ranks_together_equal_the_single_process_batch(files):
    single = TokenLoader(files, BLOCK, batch_size=6, seed=3)
    ranks = [TokenLoader(files, BLOCK, batch_size=2, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(30):  # more than one epoch (13 steps each)
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_state_checks(files):
    saved = TokenLoader(files, BLOCK, batch_size=6)
    take(saved, 3)
    state = saved.state_dict()
    other_split = TokenLoader(files, BLOCK, batch_size=3, rank=1, world_size=2)  # same global batch: fine
    other_split.load_state_dict(state)
    assert other_split.cursor == 3
    with pytest.raises(ValueError, match="block_size 8"):
        TokenLoader(files, BLOCK - 1, batch_size=6).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        TokenLoader(files, BLOCK, batch_size=6, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="data changed"):
        TokenLoader(files[:1], BLOCK, batch_size=6).load_state_dict(state)


def test_eval_batches_are_fixed_in_file_order_and_sharded(files):
    loader = TokenLoader(files, BLOCK, batch_size=2, rank=1, world_size=2)
    first = list(loader.eval_batches(3))
    take(loader, 5)  # training progress must not change evaluation
    assert_same(list(loader.eval_batches(3)), first)
    assert len(first) == 3
    x, y = first[0]
    assert x[:, 0].tolist() == [2 * BLOCK, 3 * BLOCK]  # rank 1 gets windows 2 and 3 of step 0
    single = list(TokenLoader(files, BLOCK, batch_size=4).eval_batches(3))
    rank0 = list(TokenLoader(files, BLOCK, batch_size=2, rank=0, world_size=2).eval_batches(3))
    for (xs, _), (x0, _), (x1, _) in zip(single, rank0, first):
        assert torch.equal(torch.cat([x0, x1]), xs)
    assert len(list(loader.eval_batches(1000))) == 81 // 4  # capped at the full batches there are
    assert len(list(loader.eval_batches())) == 81 // 4


def test_too_little_data(tmp_path):
    short = write_shard(tmp_path / "s.bin", np.arange(8), vocab_size=100)
    with pytest.raises(ValueError, match=r"block_size \+ 1 = 9 tokens: the data has 8 tokens.*block_size"):
        TokenLoader([short], block_size=8, batch_size=1)
    loader = TokenLoader([short], block_size=3, batch_size=4)  # 2 windows, one batch needs 4
    with pytest.raises(ValueError, match="fewer than one global batch"):
        loader.next_batch()
    with pytest.raises(ValueError, match="fewer than one global batch"):
        loader.eval_batches(1)


def test_bad_arguments(files):
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(files, BLOCK, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TokenLoader(files, BLOCK, 0)
    with pytest.raises(ValueError, match="at least one shard"):
        TokenLoader([], BLOCK, 2)
