"""ClassAwareSampler: group structure, determinism, rank splits, small classes, resume state."""
from collections import Counter

import numpy as np
import pytest

from dr.bake.sampler import ClassAwareSampler, check_batch_size

# 6 classes of very different sizes: 40, 25, 9, 3, 2 and 1 images, interleaved
_SIZES = {0: 40, 1: 25, 2: 9, 3: 3, 4: 2, 5: 1}
LABELS = np.random.default_rng(0).permutation(np.concatenate([np.full(n, c) for c, n in _SIZES.items()])).tolist()


def _groups(sampler):
    idx = np.array(list(sampler))
    assert len(idx) == len(sampler)
    return idx.reshape(-1, 1 + sampler.num_intra)


@pytest.mark.parametrize('m', [1, 3])
def test_groups_share_the_anchor_class(m):
    labels = np.array(LABELS)
    s = ClassAwareSampler(LABELS, num_intra=m, num_replicas=1, rank=0, seed=3)
    groups = _groups(s)
    assert len(groups) == len(LABELS)
    assert (labels[groups] == labels[groups[:, :1]]).all()
    # every image is an anchor exactly once per epoch
    assert sorted(groups[:, 0].tolist()) == list(range(len(LABELS)))
    for row in groups:
        size = _SIZES[labels[row[0]]]
        pals = row[1:].tolist()
        if size == 1:
            assert pals == [row[0]] * m  # singleton: the anchor repeats
        elif size - 1 >= m:
            assert row[0] not in pals and len(set(pals)) == m  # without replacement, anchor excluded
        else:
            assert row[0] not in pals  # class too small: with replacement, still never the anchor
    assert len(s) == len(LABELS) * (1 + m)


def test_small_class_with_replacement_draws_all_mates():
    labels = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]  # class 0 has 2 mates per anchor but M = 4
    s = ClassAwareSampler(labels, num_intra=4, num_replicas=1, rank=0, seed=0)
    seen = Counter()
    for epoch in range(20):
        s.set_epoch(epoch)
        for row in _groups(s):
            if labels[row[0]] == 0:
                assert row[0] not in row[1:]
                seen.update(row[1:].tolist())
    assert set(seen) == {0, 1, 2}


def test_pals_are_uniform_without_replacement():
    labels = [0] * 5 + [1] * 3
    s = ClassAwareSampler(labels, num_intra=2, num_replicas=1, rank=0, seed=1)
    counts = Counter()
    for epoch in range(600):
        s.set_epoch(epoch)
        for row in _groups(s):
            if row[0] == 0:
                counts[tuple(sorted(row[1:].tolist()))] += 1
    assert set(counts) == {(a, b) for a in range(1, 5) for b in range(a + 1, 5)}  # all 6 pairs of mates
    freq = np.array(list(counts.values())) / 600
    assert np.abs(freq - 1 / 6).max() < 0.06


def test_determinism_per_epoch():
    a = ClassAwareSampler(LABELS, num_intra=2, num_replicas=1, rank=0, seed=7)
    b = ClassAwareSampler(LABELS, num_intra=2, num_replicas=1, rank=0, seed=7)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating again gives the same epoch
    b.set_epoch(5)
    assert list(a) != list(b)
    c = ClassAwareSampler(LABELS, num_intra=2, num_replicas=1, rank=0, seed=8)
    c.set_epoch(4)
    assert list(a) != list(c)


@pytest.mark.parametrize('drop_last', [False, True])
def test_ranks_have_disjoint_anchors_covering_the_dataset(drop_last):
    n, world = len(LABELS), 3  # 80 images: not divisible by 3
    samplers = [ClassAwareSampler(LABELS, num_intra=1, num_replicas=world, rank=r, seed=2, drop_last=drop_last)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(1)
    anchors = [_groups(s)[:, 0].tolist() for s in samplers]
    assert len({len(a) for a in anchors}) == 1  # equal per-rank lengths
    assert {len(s) for s in samplers} == {len(anchors[0]) * 2}
    flat = [i for a in anchors for i in a]
    if drop_last:
        assert len(flat) == n - n % world and len(set(flat)) == len(flat)
    else:
        assert len(flat) == -(-n // world) * world and set(flat) == set(range(n))
        assert len(flat) - len(set(flat)) == len(flat) - n  # only the padding repeats
    # the pals of an anchor position are the same whichever rank draws them: compare to a single-process run
    single = ClassAwareSampler(LABELS, num_intra=1, num_replicas=1, rank=0, seed=2)
    single.set_epoch(1)
    order, split_order = single.anchor_order(), samplers[0].anchor_order()
    k = min(len(order), len(split_order))
    assert order[:k].tolist() == split_order[:k].tolist()


def test_rank_pals_match_a_single_process_draw():
    world = 2
    ranks = [ClassAwareSampler(LABELS, num_intra=2, num_replicas=world, rank=r, seed=5) for r in range(world)]
    single = ClassAwareSampler(LABELS, num_intra=2, num_replicas=1, rank=0, seed=5)
    g_single = _groups(single)  # positions 0..79
    for r, s in enumerate(ranks):
        np.testing.assert_array_equal(_groups(s), g_single[r::world])


def test_no_shuffle_keeps_order():
    s = ClassAwareSampler(LABELS, num_intra=1, num_replicas=2, rank=1, shuffle=False)
    assert _groups(s)[:, 0].tolist() == list(range(1, len(LABELS), 2))


def test_state_dict_round_trip():
    s = ClassAwareSampler(LABELS, num_intra=1, num_replicas=1, rank=0, seed=11)
    s.set_epoch(6)
    state = s.state_dict()
    assert state == {'epoch': 6, 'seed': 11}
    resumed = ClassAwareSampler(LABELS, num_intra=1, num_replicas=1, rank=0, seed=0)
    resumed.load_state_dict(state)
    assert list(resumed) == list(s)
    with pytest.raises(KeyError, match='epoch'):
        resumed.load_state_dict({'seed': 1})


def test_num_intra_zero_is_a_plain_distributed_sampler():
    s = ClassAwareSampler(LABELS, num_intra=0, num_replicas=1, rank=0, seed=0)
    assert sorted(s) == list(range(len(LABELS))) and len(s) == len(LABELS)


def test_bad_arguments():
    with pytest.raises(ValueError, match='rank'):
        ClassAwareSampler(LABELS, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match='bake-intra'):
        ClassAwareSampler(LABELS, num_intra=-1, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match='integers'):
        ClassAwareSampler([0.5, 1.0], num_replicas=1, rank=0)


def test_check_batch_size():
    check_batch_size(64, 1)
    check_batch_size(64, 3)
    check_batch_size(7, 0)
    with pytest.raises(ValueError, match=r'-b/--batch-size 63 must be a multiple of 1 \+ --bake-intra = 2'):
        check_batch_size(63, 1)
    with pytest.raises(ValueError, match='--bake-intra'):
        check_batch_size(10, 3)
    with pytest.raises(ValueError, match='--bake-intra'):
        check_batch_size(8, -1)
