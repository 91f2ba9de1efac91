"""The BLAS thread decision (mpifed/train/threads.py) on environment dicts: the user's
variables respected, SLURM's per-task CPUs taken as the rank's own, else the node's cores
shared by its ranks."""

from __future__ import annotations

import pytest

from mpifed.errors import UserError
from mpifed.train.threads import choose_threads


def test_without_variables_the_node_cores_are_shared_by_its_ranks():
    choice = choose_threads({}, cores=16, ranks_here=4)
    assert (choice.threads, choice.limit) == (4, True)
    assert "16 cores shared by 4 rank(s)" in choice.reason
    assert choose_threads({}, cores=2, ranks_here=3).threads == 1  # never zero


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"])
def test_a_users_variable_is_left_as_set(name):
    choice = choose_threads({name: "3", "SLURM_CPUS_PER_TASK": "8"}, cores=16, ranks_here=4)
    assert (choice.threads, choice.limit) == (3, False)  # mpifed sets no limit at all
    assert f"{name}=3" in choice.reason and "set by the user" in choice.reason


def test_the_blas_librarys_own_variable_is_the_count_reported():
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "6"}
    choice = choose_threads(env, cores=16, ranks_here=1)
    assert choice.threads == 6 and "OMP_NUM_THREADS=1" in choice.reason
    assert choose_threads({"OMP_NUM_THREADS": "4,2"}, 16, 1).threads == 4  # nested levels


def test_slurm_cpus_per_task_are_the_ranks_own_and_not_divided_again():
    # 4 ranks on the node, 8 CPUs each: 8 threads, not 8 // 4 (the old double division)
    choice = choose_threads({"SLURM_CPUS_PER_TASK": "8"}, cores=8, ranks_here=4)
    assert (choice.threads, choice.limit) == (8, True)
    assert "SLURM_CPUS_PER_TASK=8" in choice.reason
    # an affinity mask narrower than the request caps it
    capped = choose_threads({"SLURM_CPUS_PER_TASK": "8"}, cores=2, ranks_here=1)
    assert capped.threads == 2 and "capped" in capped.reason


def test_mpifed_blas_threads_wins_over_everything():
    env = {"MPIFED_BLAS_THREADS": "2", "OMP_NUM_THREADS": "5", "SLURM_CPUS_PER_TASK": "8"}
    choice = choose_threads(env, cores=16, ranks_here=1)
    assert (choice.threads, choice.limit) == (2, True)


def test_empty_variables_count_as_unset():
    assert choose_threads({"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": " "}, 6, 2).threads == 3


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK",
                                  "MPIFED_BLAS_THREADS"])
@pytest.mark.parametrize("value", ["0", "abc", "-2", "1.5"])
def test_nonsense_is_refused_with_the_variable_named(name, value):
    with pytest.raises(UserError, match=rf"^{name}='{value}': a thread count must be"):
        choose_threads({name: value}, cores=4, ranks_here=1)


def test_info_groups_the_ranks_that_agree():
    from mpifed.cli.info import rank_list

    assert rank_list([0]) == "rank 0"
    assert rank_list([0, 1, 2, 3]) == "ranks 0-3"
    assert rank_list([0, 1, 5, 7, 8]) == "ranks 0-1, 5, 7-8"
