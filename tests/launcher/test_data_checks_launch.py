"""Institutions whose files declare different class counts stop the run with one named error."""


from conftest import run_mpi, write_site


def test_institutions_declaring_different_num_classes(tmp_path):
    write_site(tmp_path / "site-0.h5", 40, 0, classes=3)
    write_site(tmp_path / "site-1.h5", 40, 1, classes=4)
    (tmp_path / "run.toml").write_text(
        '[data]\ntrain = "site-{institution}.h5"\n[optim]\nbatch_size = 4\n'
        '[federated]\ninstitutions = 2\nrounds = 1\n[run]\nout = "out"\n')
    done = run_mpi(2, ["train", "run.toml"], cwd=tmp_path, timeout=60)
    assert done.returncode == 1 and "declare different num_classes ([3, 4])" in done.stderr
