"""The cost model against hand-computed values; the scaling suite and plots end to end."""

from __future__ import annotations

import json

import pytest

from mpifed.benchmarks.costmodel import CostModel
from mpifed.benchmarks.predict import predictions


def test_ring_cost_formula():
    model = CostModel(alpha=1e-6, beta=1e-9, gamma=2e-9)
    # p = 4, S = 1e6: 6 messages, 1.5e6 bytes moved, 0.75e6 bytes reduced
    assert model.ring(4, 1e6) == pytest.approx(6e-6 + 1.5e-3 + 1.5e-3)
    assert model.ring(1, 1e6) == 0.0
    assert model.hierarchical(2, 4, 8e6, intra=1e-3) == pytest.approx(1e-3 + model.ring(2, 2e6))
    assert model.weak_efficiency(3.0, 1.0) == 0.75


def test_predictions_fall_with_ranks():
    model = CostModel(2e-6, 1 / 10e9, 1 / 12e9)
    rows = predictions(model, 5e-3, 2e6, 4, 20e9, [2 ** k for k in range(11)])
    effs = [r["ring_efficiency"] for r in rows]
    assert effs[0] == 1.0 and all(a >= b for a, b in zip(effs, effs[1:]))
    assert rows[-1]["nodes"] == 256 and rows[-1]["hierarchical_seconds"] > 0


def test_link_fit_recovers_alpha_and_beta():
    from mpifed.benchmarks.costmodel import fit_link

    sizes = [2.0 ** k for k in range(10, 25)]
    alpha, beta = 40e-6, 1 / 2e9
    for ranks in (2, 4):
        times = [2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * s * beta for s in sizes]
        link = fit_link(sizes, times, ranks)
        assert link.alpha == pytest.approx(alpha, rel=1e-6)
        assert link.beta == pytest.approx(beta, rel=1e-6)


def test_two_level_model_by_hand():
    from mpifed.benchmarks.costmodel import Link, TwoLevelModel

    model = TwoLevelModel(intra=Link(1e-6, 1e-10), inter=Link(50e-6, 5e-10))
    # flat ring on 2 x 2: 6 messages and 1.5 S bytes, every step waiting on the TCP link
    assert model.ring(2, 2, 4e6) == pytest.approx(6 * 50e-6 + 1.5 * 4e6 * 5e-10)
    assert model.ring(1, 2, 4e6) == pytest.approx(2 * 1e-6 + 4e6 * 1e-10)
    # hierarchical on 2 x 2: the node's exchange of S, then a 2-node ring of S/2
    assert model.hierarchical(2, 2, 4e6) == pytest.approx(
        2 * 1e-6 + 4e6 * 1e-10 + 2 * 50e-6 + 2e6 * 5e-10)
    assert model.predict("hierarchical", 4, 1, 4e6) == model.ring(4, 1, 4e6)


def _sweep(nodes, per_node, link_time):
    sizes = [4096 * 4 ** k for k in range(8)]
    rows = [{"size": s, **{a: {"time_us": link_time(s) * 1e6} for a in ("ring", "hierarchical")}}
            for s in sizes]
    return {"meta": {"ranks": nodes * per_node, "nodes": nodes, "ranks_per_node": per_node},
            "rows": rows}


def test_held_out_configurations_are_predicted_from_the_fit():
    from mpifed.benchmarks.costmodel import Link, TwoLevelModel
    from mpifed.benchmarks.predict import fit_two_level, held_out_rows

    truth = TwoLevelModel(Link(3e-6, 1 / 6e9), Link(45e-6, 1 / 1.5e9))
    one_node = _sweep(1, 2, lambda s: truth.ring(1, 2, s))
    two_nodes = _sweep(2, 1, lambda s: truth.ring(2, 1, s))
    model = fit_two_level([one_node, two_nodes])
    assert model.inter.alpha == pytest.approx(45e-6, rel=1e-6)
    held = _sweep(2, 2, lambda s: truth.ring(2, 2, s))
    rows = held_out_rows(model, held)
    ring = [r for r in rows if r["algorithm"] == "ring"]
    assert all(abs(r["error"]) < 1e-6 for r in ring)
    with pytest.raises(ValueError, match="one node or on one rank per node"):
        fit_two_level([held])


def test_auto_tells_window_arrays_from_ordinary_ones():
    from mpifed.comm.collectives import choose_algorithm

    # one node of 2: window arrays go hierarchical, ordinary ones by size (no copy into a window)
    assert choose_algorithm(1 << 20, 2, 2, window=True, nodes=1) == "hierarchical"
    assert choose_algorithm(1 << 20, 2, 2, window=False, nodes=1) == "ring"
    assert choose_algorithm(64 << 10, 2, 2, window=False, nodes=1) == "mpi"
    # 2 nodes x 2: window arrays go hierarchical; ordinary ones take the flat ring (measured
    # faster than the copy into the window), unless MPIFED_HIERARCHICAL_COPY_MIN_BYTES says so
    assert choose_algorithm(16 << 20, 4, 2, window=True, nodes=2) == "hierarchical"
    assert choose_algorithm(16 << 20, 4, 2, window=False, nodes=2) == "ring"
    assert choose_algorithm(4 << 10, 4, 2, window=False, nodes=2) == "mpi"


def test_the_copy_path_is_taken_from_the_size_the_environment_sets(monkeypatch):
    from mpifed.comm import collectives

    monkeypatch.setenv("MPIFED_HIERARCHICAL_COPY_MIN_BYTES", str(256 << 10))
    collectives._threshold.cache_clear()
    collectives._smallest_threshold.cache_clear()
    try:
        assert collectives.choose_algorithm(16 << 20, 4, 2, window=False, nodes=2) == \
            "hierarchical"
        assert collectives.choose_algorithm(128 << 10, 4, 2, window=False, nodes=2) == "mpi"
    finally:
        monkeypatch.delenv("MPIFED_HIERARCHICAL_COPY_MIN_BYTES")
        collectives._threshold.cache_clear()
        collectives._smallest_threshold.cache_clear()


def test_node_bytes_count_every_pass_by_hand():
    from mpifed.benchmarks.costmodel import node_bytes

    mib = 1 << 20
    # one node of 2, window: read the 2 halves (S), write the slice into 2 segments (S)
    assert node_bytes(1, 2, 4 * mib, "window") == 8 * mib
    # ordinary arrays add the copy into the window and back: read and write S twice
    assert node_bytes(1, 2, 4 * mib, "ordinary") == 8 * mib + 16 * mib
    # 2 x 2, 4 MiB: sum into a 2 MiB piece (4 + 2), write it back (2 + 4): 12 MiB
    assert node_bytes(2, 2, 4 * mib, "window") == 12 * mib
    # 64 MiB: the 32 MiB piece comes on new pages, zeroed by the kernel first: 32 MiB more
    assert node_bytes(2, 2, 64 * mib, "window") == (64 + 32 + 32 + 64 + 32) * mib
    assert node_bytes(2, 2, 64 * mib, "ordinary") == (256 + 224) * mib


def test_link_beta_by_buffer_size_interpolates_in_log_size():
    from mpifed.benchmarks.costmodel import Link

    link = Link(1e-6, 5e-10, ((1e6, 1e-9), (1e8, 3e-9)))
    assert link.beta_at(1e7) == pytest.approx(2e-9)  # halfway in log size
    assert link.beta_at(1e3) == 1e-9 and link.beta_at(1e9) == 3e-9  # constant past the ends
    assert Link(1e-6, 5e-10).beta_at(1e7) == 5e-10


def test_hierarchical_with_host_memory_by_hand():
    from mpifed.benchmarks.costmodel import Link, Memory, TwoLevelModel

    mib = 1 << 20
    memory = Memory(((1.0, 30e9),), fixed=20e-6)
    model = TwoLevelModel(Link(10e-6, 1 / 6e9), Link(30e-6, 1 / 2e9), memory)
    s = 64 * mib
    # 2 x 2 ordinary, 4 ranks on one host: 20 us + 4 ranks * 480 MiB / 30 GB/s
    # + a 2-node ring of 32 MiB: 2 steps of 30 us + 16 MiB / 2 GB/s
    inside = 20e-6 + 4 * 480 * mib / 30e9
    between = 2 * (30e-6 + 16 * mib / 2e9)
    assert model.hierarchical(2, 2, s, "ordinary", 4) == pytest.approx(inside + between)
    # each node on its own host: 2 ranks share the bandwidth
    assert model.hierarchical(2, 2, s, "ordinary") == pytest.approx(
        20e-6 + 2 * 480 * mib / 30e9 + between)
    # one rank per node: the ring itself; flat ring on 2 x 2: 6 steps of S/4 on the TCP link
    assert model.predict("hierarchical", 4, 1, s) == model.ring(4, 1, s)
    assert model.ring(2, 2, s) == pytest.approx(6 * (30e-6 + 16 * mib / 2e9))
    # one NIC for the node's 2 rings: their 2 x 16 MiB between nodes take twice as long
    shared = TwoLevelModel(model.intra, model.inter, memory, shared_link=True)
    assert shared.hierarchical(2, 2, s, "window", 4) == pytest.approx(
        model.hierarchical(2, 2, s, "window", 4) + 32 * mib / 2e9)
    assert TwoLevelModel.from_json(json.loads(json.dumps(model.to_json()))) == model


def test_memory_and_links_fit_on_the_fit_sweeps_only():
    from mpifed.benchmarks.costmodel import Link, Memory, TwoLevelModel, node_bytes
    from mpifed.benchmarks.predict import fit_two_level, held_out_rows, host_ranks

    truth = TwoLevelModel(Link(10e-6, 1 / 6e9), Link(30e-6, 1 / 2e9),
                          Memory(((1.0, 30e9),), fixed=20e-6))
    one_node = _sweep(1, 2, lambda s: truth.ring(1, 2, s))
    for row in one_node["rows"]:  # one node: memory passes of 2 ranks plus the fixed cost
        row["hierarchical"]["time_us"] = (20e-6 + 2 * node_bytes(1, 2, row["size"],
                                                                  "ordinary") / 30e9) * 1e6
    one_node["meta"]["arrays"] = "ordinary"
    two_nodes = _sweep(2, 1, lambda s: truth.ring(2, 1, s))
    model = fit_two_level([one_node, two_nodes])
    assert model.memory.fixed == pytest.approx(20e-6)
    assert all(rate == pytest.approx(30e9) for _, rate in model.memory.curve)
    assert model.inter.beta_at(1 << 24) == pytest.approx(1 / 2e9)
    held = _sweep(2, 2, lambda s: truth.hierarchical(2, 2, s, "window", 4))
    held["meta"].update(arrays="window", transport="tcp; nodes emulated on one host")
    assert host_ranks(held["meta"]) == 4
    assert host_ranks({"ranks": 4, "nodes": 2, "ranks_per_node": 2, "transport": "ib"}) == 2
    hier = [r for r in held_out_rows(model, held) if r["algorithm"] == "hierarchical"]
    assert all(abs(r["error"]) < 1e-6 for r in hier)
