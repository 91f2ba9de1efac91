"""Partition schemes: every row goes to exactly one site, with the skew each scheme promises."""

import numpy as np
import pytest

from mpifed.data.partition import split
from mpifed.errors import UserError

LABELS = np.repeat(np.arange(10), 50)  # 500 rows, 10 classes


def assert_is_partition(parts, n):
    rows = np.concatenate(parts)
    assert len(rows) == n and len(np.unique(rows)) == n


def test_iid_is_balanced():
    parts = split(LABELS, 4, "iid", seed=0)
    assert_is_partition(parts, 500)
    assert sorted(len(p) for p in parts) == [125] * 4


def test_dirichlet_skews_labels_more_for_small_alpha():
    def skew(alpha):
        parts = split(LABELS, 5, "dirichlet", seed=1, alpha=alpha)
        assert_is_partition(parts, 500)
        shares = [np.bincount(LABELS[p], minlength=10) / len(p) for p in parts]
        return np.mean([np.abs(s - 0.1).sum() for s in shares])
    assert skew(0.1) > skew(100.0) + 0.5


def test_pathological_gives_few_classes_per_site():
    parts = split(LABELS, 5, "pathological", seed=2, classes_per_site=2)
    assert_is_partition(parts, 500)
    assert all(len(np.unique(LABELS[p])) == 2 for p in parts)


# Classes of very different sizes: the old sort-and-shard cut straddled class boundaries here and
# gave some sites three or four labels with C = 2.
UNEQUAL = np.repeat(np.arange(10), [5, 200, 13, 90, 41, 7, 150, 60, 24, 110])


@pytest.mark.parametrize("sites,per_site", [(5, 2), (10, 2), (4, 3), (7, 2), (3, 4), (10, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pathological_holds_at_most_c_labels_with_unequal_classes(sites, per_site, seed):
    parts = split(UNEQUAL, sites, "pathological", seed=seed, classes_per_site=per_site)
    assert_is_partition(parts, len(UNEQUAL))
    held = [set(UNEQUAL[p].tolist()) for p in parts]
    assert all(1 <= len(h) <= per_site for h in held)
    # Each class is split in near-equal parts among the sites that hold it.
    for label in range(10):
        counts = [int(np.sum(UNEQUAL[p] == label)) for p in parts if label in set(UNEQUAL[p])]
        assert sum(counts) == np.sum(UNEQUAL == label) and max(counts) - min(counts) <= 1


def test_pathological_refuses_what_it_cannot_guarantee():
    with pytest.raises(UserError, match="--classes-per-site 11"):
        split(LABELS, 5, "pathological", seed=0, classes_per_site=11)
    with pytest.raises(UserError, match="some rows would have no site"):
        split(LABELS, 3, "pathological", seed=0, classes_per_site=2)


def test_sizes_follow_the_fractions():
    parts = split(LABELS, 3, "sizes", seed=3, sizes=[0.5, 0.3, 0.2])
    assert_is_partition(parts, 500)
    assert [len(p) for p in parts] == [250, 150, 100]
    with pytest.raises(UserError, match="sum to 1"):
        split(LABELS, 3, "sizes", seed=3, sizes=[0.5, 0.3, 0.3])
