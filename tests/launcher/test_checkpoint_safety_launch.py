"""A resumed run past its last step says there is nothing to do, under mpiexec."""




def test_resuming_past_the_end_is_nothing_to_do(tmp_path):
    from conftest import run_mpi, write_site

    write_site(tmp_path / "d.h5", 40, 0)
    run = ['train', 'run.toml']
    (tmp_path / "run.toml").write_text('[data]\ntrain = "d.h5"\n[optim]\nbatch_size = 4\n'
                                       'steps = 6\n[run]\nout = "o"\ncheckpoint_every = 4\n')
    assert run_mpi(1, run, cwd=tmp_path, timeout=60).returncode == 0
    done = run_mpi(1, run + ["--set", "optim.steps=3"], cwd=tmp_path, timeout=60)
    assert done.returncode == 1 and "nothing to do" in done.stderr, done.stderr
    assert "samples/s" not in done.stdout
