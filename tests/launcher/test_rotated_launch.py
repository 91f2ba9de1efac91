"""federated.compression = "rotated" under mpiexec: the federation equals a serial simulation
that encodes each institution's update with the same seeds, sends about 64/bits times fewer
bytes to the root (float64 models), stays near uncompressed FedAvg, resumes to the same bits,
and under DP keeps every institution's share of the sum within the clip."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import (
    assert_same_bits,
    read_metrics,
    run_mpi,
    write_config,
    write_dataset,
)
from reference import global_batches, initial_weights, mlp_sgd

from mpifed.federated.institutions import participants
from mpifed.federated.rotated import RotatedCodec, rounding_rng
from mpifed.federated.rotation import rotate, rotation_signs, unrotate

FEATURES, CLASSES, HIDDEN, SEED = 5, 3, 4, 5
SAMPLES = [23, 31, 17]


def config(extra=None, rounds=4, strategy="fedavg", dp=None, sizes=(1, 1, 1)):
    """Institutions of `sizes` ranks (three of one rank each), a float64 MLP, FedAvg, 3 local
    steps."""
    federated = {"institution_sizes": list(sizes), "rounds": rounds, "local_steps": 3,
                 "strategy": strategy, **(extra or {})}
    if dp is not None:
        federated["dp"] = dp
    return {"data": {"train": "site-{institution}.h5", "shuffle": True},
            "model": {"kind": "mlp", "hidden": [HIDDEN], "dtype": "float64"},
            "optim": {"lr": 0.1, "momentum": 0.5, "batch_size": 3},
            "federated": federated,
            "run": {"seed": SEED, "out": "out", "progress": "none"}}


@pytest.fixture
def sites(tmp_path):
    return [write_dataset(tmp_path / f"site-{k}.h5", n, seed=k) for k, n in enumerate(SAMPLES)]


def flat(weights) -> np.ndarray:
    return np.concatenate([w.ravel() for w in weights])


def split(vector, like):
    cuts = np.cumsum([0] + [w.size for w in like])
    return [vector[a:b].reshape(w.shape) for a, b, w in zip(cuts, cuts[1:], like)]


def simulate(sites, rounds, bits=None, sizes=(1, 1, 1), fraction=1.0):
    """Serial FedAvg over the sites (institution k of sizes[k] ranks, each taking batches of 3;
    each round the `participants` sample); with bits, each update (model minus the round's
    global model) goes through the codec with the run's seeds, as mpifed's leaders do."""
    weights = initial_weights(FEATURES, HIDDEN, CLASSES, SEED)
    streams = [global_batches(len(y), ranks, 3, SEED, True) for (_, y), ranks in zip(sites, sizes)]
    codec = RotatedCodec(bits, SEED) if bits else None
    for rnd in range(rounds):
        start, mean = flat(weights), 0.0
        chosen = participants(len(sites), fraction, SEED, rnd)
        total = sum(len(sites[k][1]) for k in chosen)
        for k in chosen:
            (x, y), stream = sites[k], streams[k]
            local = flat(mlp_sgd(x, y, weights, itertools.islice(stream, 3), 0.1, 0.5))
            delta = local - start
            if codec is not None:
                wire = codec.encode(delta, rnd, rounding_rng(SEED, rnd, k))
                delta = codec.decode(wire, rnd, delta.size)[0]
            mean = mean + len(y) / total * (start + delta)
        weights = split(mean, weights)
    return flat(weights)


def model_of(tmp_path) -> np.ndarray:
    from helpers import model_vector
    return model_vector(tmp_path / "out" / "model.h5")


@pytest.mark.parametrize("sizes,bits", [((1, 1, 1), 8), ((1, 1, 1), 3), ((1, 2, 1), 8),
                                        ((1, 1), 5)])
def test_rotated_federation_equals_serial_simulation_and_sends_less(tmp_path, sites, sizes,
                                                                    bits):
    sites, ranks = sites[:len(sizes)], sum(sizes)
    write_config(tmp_path / "fed.toml", config({"compression": "rotated",
                                                "compression_bits": bits}, sizes=sizes))
    done = run_mpi(ranks, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = model_of(tmp_path)
    np.testing.assert_allclose(got, simulate(sites, 4, bits, sizes), rtol=1e-9, atol=1e-12)
    # the uncompressed run, side by side: bytes and the model it reaches
    write_config(tmp_path / "plain.toml", {**config(sizes=sizes),
                                           "run": {"seed": SEED, "out": "plain",
                                                   "progress": "none"}})
    done = run_mpi(ranks, ["train", "plain.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    params, others = got.size, len(sizes) - 1  # 39 float64 values; rotated to 64 coordinates
    rotated = read_metrics(tmp_path / "out", "round")[0]["bytes_to_root"]
    plain = read_metrics(tmp_path / "plain", "round")[0]["bytes_to_root"]
    # each non-root leader: its range (8 B) and 64 packed coordinates, plus its report
    wire = 8 + -(-64 * bits // 8) + 40
    assert rotated == others * wire
    assert plain == others * (8 * params + 40)
    record = read_metrics(tmp_path / "out", "round")[0]
    assert record["compression_ratio"] == pytest.approx(plain / rotated)
    assert [e["bytes_sent"] for e in record["institutions"]] == [0] + [wire] * others
    summary = read_metrics(tmp_path / "out", "summary")[0]
    assert summary["compression_ratio"] == pytest.approx(plain / rotated)
    assert read_metrics(tmp_path / "plain", "summary")[0]["compression_ratio"] == 1.0


def test_a_sampled_federation_decodes_only_the_senders(tmp_path, sites):
    """fraction 0.34: one institution of three per round, at times not the root's own (which
    then sends nothing and reads the others' wire length from its own placeholder)."""
    rounds = 4
    assert any(0 not in participants(3, 0.34, SEED, r) for r in range(rounds))
    write_config(tmp_path / "fed.toml", config({"compression": "rotated", "fraction": 0.34,
                                                "compression_bits": 6}, rounds=rounds))
    done = run_mpi(3, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(model_of(tmp_path), simulate(sites, rounds, 6, fraction=0.34),
                               rtol=1e-9, atol=1e-12)


def test_rotated_training_stays_near_uncompressed_fedavg(tmp_path, sites):
    """Sixteen rounds at 8 bits: the model differs from uncompressed FedAvg's by less than 2%
    of its size (the quantisation errors are unbiased and small: one step is 2/255 of an
    update's largest rotated coordinate)."""
    write_config(tmp_path / "fed.toml", config({"compression": "rotated"}, rounds=16))
    done = run_mpi(3, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got, plain = model_of(tmp_path), simulate(sites, 16)
    assert np.linalg.norm(got - plain) < 0.02 * np.linalg.norm(plain)
    assert not np.array_equal(got, plain)  # compression did change the updates


def test_a_resumed_rotated_run_has_the_same_bits(tmp_path, sites):
    layers = config({"compression": "rotated", "compression_bits": 4}, rounds=4)
    write_config(tmp_path / "full.toml", {**layers, "run": {**layers["run"], "out": "full"}})
    done = run_mpi(3, ["train", "full.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    half = {**layers, "federated": {**layers["federated"], "rounds": 2},
            "run": {**layers["run"], "out": "half", "checkpoint_every": 1}}
    write_config(tmp_path / "half.toml", half)
    assert run_mpi(3, ["train", "half.toml"], cwd=tmp_path).returncode == 0
    write_config(tmp_path / "rest.toml", {**layers, "run": {**layers["run"], "out": "half",
                                                             "resume": "auto"}})
    done = run_mpi(3, ["train", "rest.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_bits(tmp_path / "half" / "model.h5", tmp_path / "full" / "model.h5")


@pytest.mark.parametrize("strategy", ["fedmedian", "krum"])
def test_robust_strategies_see_each_decoded_model(tmp_path, sites, strategy):
    """Without secure aggregation the root decodes every institution's update on its own, so
    the robust rules run on the decoded models: fedmedian's coordinate-wise median of them."""
    write_config(tmp_path / "fed.toml", config({"compression": "rotated"}, rounds=1,
                                               strategy=strategy))
    done = run_mpi(3, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    weights = initial_weights(FEATURES, HIDDEN, CLASSES, SEED)
    start, codec, models = flat(weights), RotatedCodec(8, SEED), []
    for k, (x, y) in enumerate(sites):
        stream = global_batches(len(y), 1, 3, SEED, True)
        delta = flat(mlp_sgd(x, y, weights, itertools.islice(stream, 3), 0.1, 0.5)) - start
        wire = codec.encode(delta, 0, rounding_rng(SEED, 0, k))
        models.append(start + codec.decode(wire, 0, delta.size)[0])
    if strategy == "fedmedian":
        want = np.median(np.stack(models), axis=0)
    else:  # krum with f = 0 and 3 models: the one with the least squared distance to its 1 nearest
        dist = [[float(np.sum((a - b) ** 2)) for b in models] for a in models]
        scores = [sorted(d)[1] for d in dist]
        want = models[int(np.argmin(scores))]
    np.testing.assert_allclose(model_of(tmp_path), want, rtol=1e-9, atol=1e-12)


def test_under_dp_each_share_keeps_the_clip(tmp_path, sites):
    """DP without noise, clip 0.05 (below every update's norm): each decoded update is clipped
    again at the root, so the mean update's norm stays <= clip, as without compression; the
    compressed model is within the quantisation error of the uncompressed DP one."""
    dp = {"clip": 0.05, "noise_multiplier": 0.0}
    out = {}
    for name, extra in (("rot", {"compression": "rotated"}), ("plain", {})):
        layers = config(extra, rounds=1, dp=dp)
        write_config(tmp_path / f"{name}.toml", {**layers, "run": {**layers["run"], "out": name}})
        done = run_mpi(3, ["train", f"{name}.toml"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        from helpers import model_vector
        out[name] = model_vector(tmp_path / name / "model.h5")
    # the bytes: each non-root leader sends its range and 64 8-bit integers where it sent 39
    # float64s; its own figure stays in its own folder, the root's record has the aggregate
    rot = read_metrics(tmp_path / "rot", "round")[0]
    plain = read_metrics(tmp_path / "plain", "round")[0]
    assert rot["bytes_to_root"] == 2 * (8 + 64) and plain["bytes_to_root"] == 2 * 8 * 39
    assert rot["compression_ratio"] == pytest.approx(39 * 8 / 72)
    assert "institutions" not in rot or all("bytes_sent" not in e for e in rot["institutions"])
    own = read_metrics(tmp_path / "rot" / "institution-1", "round")[0]
    assert own["bytes_sent"] == 72 and own["compression_ratio"] == pytest.approx(39 * 8 / 72)
    start = flat(initial_weights(FEATURES, HIDDEN, CLASSES, SEED))
    moved = np.linalg.norm(out["rot"] - start)
    assert moved <= 0.05 + 1e-12
    assert np.linalg.norm(out["rot"] - out["plain"]) < 0.1 * np.linalg.norm(out["plain"] - start)
    assert not np.array_equal(out["rot"], out["plain"])


def test_secure_aggregation_sums_the_rotated_integers(tmp_path, sites):
    """One round under secure aggregation: the model is the uncompressed FedAvg model within
    the quantisation bound of the weighted sum (each of K senders' integers is off by < 1 step
    per rotated coordinate: ||error|| < K step sqrt(d') / sum n, with step = 2 B / 255 and B
    the largest |coordinate| of the rotated weighted updates), and each non-root leader sends
    64 coordinates of 8 + ceil(log2 3) = 10 bits and two 64-bit tail words, where the
    uncompressed masked vector is 41 64-bit words (the relayed key exchange the same in both)."""
    models = {}
    for name, extra in (("rot", {"compression": "rotated"}), ("plain", {})):
        layers = config({"secure_aggregation": True, **extra}, rounds=1)
        write_config(tmp_path / f"{name}.toml", {**layers, "run": {**layers["run"], "out": name}})
        done = run_mpi(3, ["train", f"{name}.toml"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        from helpers import model_vector
        models[name] = model_vector(tmp_path / name / "model.h5")
    weights = initial_weights(FEATURES, HIDDEN, CLASSES, SEED)
    start, rotated = flat(weights), []
    signs = rotation_signs(SEED, 0, start.size)
    for (x, y) in sites:
        stream = global_batches(len(y), 1, 3, SEED, True)
        delta = flat(mlp_sgd(x, y, weights, itertools.islice(stream, 3), 0.1, 0.5)) - start
        rotated.append(rotate(len(y) * delta, signs))
    step = 2 * max(np.abs(r).max() for r in rotated) / 255
    exact = start + unrotate(sum(rotated), signs, start.size) / sum(SAMPLES)
    np.testing.assert_allclose(models["plain"], exact, atol=1e-8)  # the reference holds
    error = np.linalg.norm(models["rot"] - exact)
    assert 0 < error < 3 * step * np.sqrt(64) / sum(SAMPLES)
    rot = read_metrics(tmp_path / "rot", "round")[0]["bytes_to_root"]
    plain = read_metrics(tmp_path / "plain", "round")[0]["bytes_to_root"]
    relayed = plain // 2 - 41 * 8
    assert rot == 2 * (64 * 10 // 8 + 16 + relayed)


def test_rotated_with_secure_aggregation_and_dp_is_refused(tmp_path, sites):
    write_config(tmp_path / "fed.toml", config({"compression": "rotated",
                                                "secure_aggregation": True, "keys": "k"},
                                               dp={"clip": 1.0, "noise_multiplier": 1.0}))
    done = run_mpi(3, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode != 0
    assert "federated.compression" in done.stderr and "Traceback" not in done.stderr
    assert "post-processing" in done.stderr


def test_a_nan_update_ends_every_rank_with_one_message(tmp_path, sites):
    """A leader whose update holds NaN (MPIFED_FAULT=byzantine:1:nan) refuses to encode it (its
    range would be NaN) and every rank ends, with the message and no traceback."""
    write_config(tmp_path / "fed.toml", config({"compression": "rotated"}, rounds=2))
    done = run_mpi(3, ["train", "fed.toml"], cwd=tmp_path,
                   env={"MPIFED_FAULT": "byzantine:1:nan"})
    assert done.returncode != 0
    assert "NaN or Inf" in done.stderr and "Traceback" not in done.stderr
