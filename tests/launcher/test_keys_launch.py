"""`mpifed keys new` and `keys roster` from the command line, and a federation whose keys no
dealer held: trained under a pinned roster hash, refused on every rank under another."""

import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from helpers import read_metrics, run_cli, run_mpi, write_config, write_dataset

from mpifed.config.overrides import tomllib  # tomli before Python 3.11


def public_of(key_file) -> str:
    """The raw public key (hex) of a PEM private key file, derived with `cryptography` alone."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw).hex()


def keys_new(k: int, folder, *flags):
    return run_cli(["keys", "new", str(k), str(folder), *flags])


def test_keys_new_writes_its_private_key_0600_and_prints_its_public_key(tmp_path):
    old = os.umask(0o022)  # a umask that would leave new files readable by all
    try:
        done = keys_new(3, tmp_path / "k")
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "k"
    assert sorted(p.name for p in folder.iterdir()) == ["site-3.key", "site-3.pub"]
    assert stat.S_IMODE(os.stat(folder / "site-3.key").st_mode) == 0o600
    printed = done.stdout.strip()
    assert done.stdout == printed + "\n"  # stdout is the public key alone (for scripts)
    assert printed == (folder / "site-3.pub").read_text().strip() == public_of(folder /
                                                                                "site-3.key")
    key_before = (folder / "site-3.key").read_bytes()
    again = keys_new(3, folder)
    assert again.returncode == 1 and again.stdout == ""
    assert "site-3.key' exists" in again.stderr and "--force" in again.stderr
    assert (folder / "site-3.key").read_bytes() == key_before  # untouched
    forced = keys_new(3, folder, "--force")
    assert forced.returncode == 0 and forced.stdout.strip() != printed
    assert forced.stdout.strip() == public_of(folder / "site-3.key")


def test_keys_roster_writes_the_roster_and_prints_the_sha256_of_its_bytes(tmp_path):
    printed = [keys_new(k, tmp_path).stdout.strip() for k in range(3)]
    done = run_cli(["keys", "roster", str(tmp_path), "--institutions", "3"])
    assert done.returncode == 0, done.stderr
    data = (tmp_path / "roster.toml").read_bytes()
    assert done.stdout == hashlib.sha256(data).hexdigest() + "\n"
    assert tomllib.loads(data.decode()) == {"institutions": 3, "public_keys": printed}
    missing = run_cli(["keys", "roster", str(tmp_path), "--institutions", "4"])
    assert missing.returncode == 1 and "site-3.pub" in missing.stderr
    (tmp_path / "site-2.pub").write_bytes((tmp_path / "site-0.pub").read_bytes())
    twice = run_cli(["keys", "roster", str(tmp_path), "--institutions", "3"])
    assert twice.returncode == 1 and "Traceback" not in twice.stderr
    assert "site-0.pub' and" in twice.stderr and "site-2.pub' hold the same public key" \
        in twice.stderr


def test_keys_generate_says_what_one_dealer_gives_up(tmp_path):
    done = run_cli(["keys", "generate", str(tmp_path / "k"), "--institutions", "2"])
    assert done.returncode == 0, done.stderr
    for text in (done.stdout, run_cli(["keys", "generate", "--help"]).stdout):
        assert "held every institution's private key" in " ".join(text.split())
        assert "mpifed keys new" in text
    sha256 = hashlib.sha256((tmp_path / "k" / "roster.toml").read_bytes()).hexdigest()
    assert f"SHA-256 {sha256}" in done.stdout


@pytest.fixture
def federation(tmp_path):
    """Four institutions' data, each one's key from `keys new`, the roster from `keys roster`;
    return (folder, the hash the roster command printed)."""
    for k, n in enumerate([23, 31, 17, 29]):
        write_dataset(tmp_path / f"site-{k}.h5", n, seed=k)
        assert keys_new(k, tmp_path / "keys").returncode == 0
    done = run_cli(["keys", "roster", "keys", "--institutions", "4"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path, done.stdout.strip()


def secure_dp_config(path, out, pinned):
    write_config(path, {
        "data": {"train": "site-{institution}.h5"},
        "model": {"kind": "mlp", "hidden": [4], "dtype": "float64"},
        "optim": {"lr": 0.1, "batch_size": 3},
        "federated": {"institutions": 4, "rounds": 2, "local_steps": 3,
                      "secure_aggregation": True, "secure_range": 20.0, "keys": "keys",
                      "keys_roster_sha256": pinned,
                      "dp": {"clip": 1.0, "noise_multiplier": 1.0}},
        "run": {"seed": 5, "out": out},
    })


def test_a_federation_with_keys_no_dealer_held_trains_under_its_pinned_roster(federation):
    folder, sha256 = federation
    secure_dp_config(folder / "run.toml", "out", sha256)
    done = run_mpi(4, ["train", "run.toml"], cwd=folder)
    assert done.returncode == 0, done.stderr
    assert [r["round"] for r in read_metrics(folder / "out", "round")] == [1, 2]
    assert (folder / "out" / "model.h5").exists()


def test_a_roster_that_is_not_the_pinned_one_is_refused_on_every_rank(federation):
    folder, sha256 = federation
    # Institution 3's key replaced and the roster rebuilt: a valid roster whose keys match
    # every leader's private key, only not the one the institutions agreed on.
    assert keys_new(3, folder / "keys", "--force").returncode == 0
    swapped = run_cli(["keys", "roster", "keys", "--institutions", "4"], cwd=folder)
    found = swapped.stdout.strip()
    assert found and found != sha256
    secure_dp_config(folder / "run.toml", "out", sha256)
    done = run_mpi(4, ["train", "run.toml"], cwd=folder)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("mpifed: error")]
    # One line, with no second "[rank r]" inside it: every rank raised the same refusal.
    assert errors == [f"mpifed: error [rank 0]: federated.keys_roster_sha256: the roster "
                      f"'keys/roster.toml' has SHA-256 {found}, expected {sha256}; it is not "
                      "the roster the institutions agreed on: fetch that roster again (mpifed "
                      "keys roster prints its hash) or correct federated.keys_roster_sha256"]
    assert not (folder / "out" / "model.h5").exists()
    assert not os.path.exists(folder / "out" / "metrics.jsonl") or \
        not read_metrics(folder / "out", "round")
