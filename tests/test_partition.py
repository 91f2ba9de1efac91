"""Partition schemes: every row goes to exactly one site, with the skew each scheme promises."""

import h5py
import numpy as np
import pytest
from conftest import run_cli

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
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_sizes_follow_the_fractions():
    parts = split(LABELS, 3, "sizes", seed=3, sizes=[0.5, 0.3, 0.2])
    assert_is_partition(parts, 500)
    assert [len(p) for p in parts] == [250, 150, 100]
    with pytest.raises(UserError, match="sum to 1"):
        split(LABELS, 3, "sizes", seed=3, sizes=[0.5, 0.3, 0.3])


def test_partition_command_writes_sites_and_table(tmp_path):
    with h5py.File(tmp_path / "all.h5", "w") as fh:
        fh["x"] = np.arange(1000, dtype=np.float32).reshape(500, 2)
        fh["y"] = LABELS
    done = run_cli(["data", "partition", "all.h5", "sites", "--institutions", "3", "--scheme",
                    "dirichlet", "--alpha", "0.3", "--seed", "4"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    total = 0
    for k in range(3):
        with h5py.File(tmp_path / "sites" / f"site-{k}.h5") as fh:
            assert fh.attrs["num_classes"] == 10
            np.testing.assert_array_equal(fh["x"][:, 0] // 2, np.sort(fh["x"][:, 0] // 2))
            assert np.all(LABELS[(fh["x"][:, 0] // 2).astype(int)] == fh["y"][...])
            total += len(fh["y"])
    assert total == 500 and "class_9" in done.stdout
    assert (tmp_path / "sites" / "partition.csv").read_text().startswith("site,samples,class_0")
