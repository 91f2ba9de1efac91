"""`mpifed data partition` from the command line: site files and the class-count table."""

import h5py
import numpy as np
from conftest import run_cli

LABELS = np.repeat(np.arange(10), 50)  # 500 rows, 10 classes


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
