"""The exchange with the root, in process: institutions from make_federation, leaders' models
and metadata at the root, the global model back on every rank (checked against the values each
rank put in and against MPI.bcast)."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpifed.federated.exchange import (
    META_FIELDS,
    SiteReport,
    broadcast_global,
    collect_at_root,
    send_to_root,
)
from mpifed.federated.institutions import make_federation

pytestmark = pytest.mark.mpi(min_size=1)  # each test: the ranks it needs

SIZE = 1001  # parameters


def layouts(n: int) -> list[list[int]]:
    """Institution sizes to try on n ranks: one rank each, the root alone, two halves."""
    found = [[1] * n, [1, n - 1], [n // 2, n - n // 2], [n]]
    return [sizes for i, sizes in enumerate(found)
            if min(sizes) > 0 and sizes not in found[:i]]


@pytest.fixture(params=["self", "world"])
def world(request):
    return MPI.COMM_SELF if request.param == "self" else MPI.COMM_WORLD


def model_of(institution: int) -> np.ndarray:
    return np.random.default_rng(institution).standard_normal(SIZE)


def report_of(institution: int) -> SiteReport:
    return SiteReport(samples=100.0 + institution, steps=7.0, loss=0.5 * institution)


def test_federation_follows_the_sizes(world):
    for sizes in layouts(world.size):
        fed = make_federation(world, sizes)
        owner = np.repeat(np.arange(len(sizes)), sizes)  # world rank -> institution
        assert fed.institution == owner[world.rank] and fed.sizes == sizes
        assert fed.site.size == sizes[fed.institution]
        assert fed.site_rank == world.rank - int(np.sum(sizes[:fed.institution]))
        assert fed.is_leader == (fed.site_rank == 0) == (fed.leaders is not None)
        if fed.is_leader:
            assert fed.leaders.size == len(sizes) and fed.leaders.rank == fed.institution
        assert fed.is_root == (world.rank == 0)
        fed.free()


@pytest.mark.parametrize("skip_one", [False, True], ids=["all", "one-idle"])
def test_root_collects_the_chosen_leaders_models_and_metadata(world, skip_one):
    for sizes in layouts(world.size):
        fed = make_federation(world, sizes)
        chosen = [k for k in range(len(sizes)) if not (skip_one and k == len(sizes) - 1)]
        chosen = chosen or [0]
        params, report = model_of(fed.institution), report_of(fed.institution)
        wire = report.to_array().nbytes
        assert wire == 8 * len(META_FIELDS)
        if fed.is_root:
            results, received = collect_at_root(fed, params, report, chosen)
            assert sorted(results) == chosen
            for k, (got, got_report) in results.items():
                np.testing.assert_array_equal(got, model_of(k))
                assert got_report == report_of(k)
            others = len([k for k in chosen if k != 0])
            assert received == others * (params.nbytes + wire)
        elif fed.is_leader and fed.institution in chosen:
            assert send_to_root(fed, params, report) == params.nbytes + wire
        fed.free()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_global_model_reaches_every_rank(world, dtype):
    for sizes in layouts(world.size):
        fed = make_federation(world, sizes)
        params = (model_of(99) if fed.is_root else np.full(SIZE, np.nan)).astype(dtype)
        expected = world.bcast(params.copy() if fed.is_root else None, root=0)
        sent = broadcast_global(fed, params)
        np.testing.assert_array_equal(params, expected)
        assert sent == (params.nbytes * (len(sizes) - 1) if fed.is_root else 0)
        fed.free()
