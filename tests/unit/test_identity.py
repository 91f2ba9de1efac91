"""Identity keys without a dealer: each institution's key on its own, the roster built from the
public halves, duplicates refused, the roster pinned by the SHA-256 of its bytes."""

import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from mpifed.config.overrides import tomllib  # tomli before Python 3.11
from mpifed.errors import UserError
from mpifed.federated.identity import (
    generate_keys,
    load_identity,
    new_key,
    read_roster,
    write_roster,
)


def raw_public_of_key_file(path) -> str:
    """The public key of a PEM private key file, derived here with `cryptography` alone."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw).hex()


@pytest.fixture
def federation_keys(tmp_path):
    """Four institutions that each ran `keys new` into the same folder (as if their .pub files
    had been sent to one place); return the folder."""
    for k in range(4):
        new_key(str(tmp_path), k)
    return tmp_path


def test_new_key_writes_one_private_key_0600_and_its_public_half(tmp_path):
    old = os.umask(0o022)  # a umask that would leave a new file readable by all
    try:
        public = new_key(str(tmp_path), 2)
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-2.key", "site-2.pub"]
    assert stat.S_IMODE(os.stat(tmp_path / "site-2.key").st_mode) == 0o600
    assert (tmp_path / "site-2.pub").read_text() == public + "\n"
    assert public == raw_public_of_key_file(tmp_path / "site-2.key")
    with pytest.raises(UserError, match=r"site-2\.key' exists.*--force"):
        new_key(str(tmp_path), 2)
    assert new_key(str(tmp_path), 2, force=True) != public  # a fresh key
    with pytest.raises(UserError, match="K must be >= 0"):
        new_key(str(tmp_path), -1)


def test_the_roster_lists_each_institutions_public_key_and_its_hash_is_of_its_bytes(
        federation_keys):
    path, sha256 = write_roster(str(federation_keys), 4)
    data = (federation_keys / "roster.toml").read_bytes()
    assert path == str(federation_keys / "roster.toml")
    assert sha256 == hashlib.sha256(data).hexdigest()
    roster = tomllib.loads(data.decode())
    assert roster == {"institutions": 4, "public_keys": [
        raw_public_of_key_file(federation_keys / f"site-{k}.key") for k in range(4)]}
    for k in range(4):  # each leader's own key matches the roster, with the hash pinned
        assert load_identity(str(federation_keys), k, 4, sha256).institution == k
    assert write_roster(str(federation_keys), 4)[1] == sha256  # the same bytes again


def test_the_roster_refuses_missing_malformed_and_duplicate_public_keys(federation_keys):
    folder = str(federation_keys)
    (federation_keys / "site-1.pub").unlink()
    (federation_keys / "site-3.pub").unlink()
    with pytest.raises(UserError, match=r"missing '.*site-1\.pub', '.*site-3\.pub'"):
        write_roster(folder, 4)
    new_key(folder, 1, force=True)
    (federation_keys / "site-3.pub").write_text("00" * 31 + "\n")  # 31 bytes
    with pytest.raises(UserError, match=r"site-3\.pub' is not an Ed25519 public key"):
        write_roster(folder, 4)
    (federation_keys / "site-3.pub").write_text("zz" * 32)
    with pytest.raises(UserError, match=r"site-3\.pub' is not an Ed25519 public key"):
        write_roster(folder, 4)
    (federation_keys / "site-3.pub").write_bytes((federation_keys / "site-1.pub").read_bytes())
    with pytest.raises(UserError, match=r"site-1\.pub' and '.*site-3\.pub' hold the same"):
        write_roster(folder, 4)
    assert not (federation_keys / "roster.toml").exists()  # nothing written on a refusal


def test_a_roster_that_lists_one_key_twice_is_refused_naming_both_institutions(tmp_path):
    generate_keys(str(tmp_path), 3)
    path = tmp_path / "roster.toml"
    roster = tomllib.loads(path.read_text())
    keys = roster["public_keys"]
    # A root that wants to pass for institution 2 cannot simply list one key for two places.
    path.write_text(f'institutions = 3\npublic_keys = ["{keys[0]}", "{keys[1]}", '
                    f'"{keys[0].upper()}"]\n')
    for k in range(3):
        with pytest.raises(UserError, match="same public key for institutions 0 and 2"):
            load_identity(str(tmp_path), k, 3)


def test_a_pinned_roster_hash_accepts_that_roster_and_refuses_any_other(federation_keys):
    folder = str(federation_keys)
    _, sha256 = write_roster(folder, 4)
    assert len(read_roster(folder, 4, sha256)) == 4
    assert len(read_roster(folder, 4, sha256.upper())) == 4  # hex in either case
    # Institution 3's public key replaced (e.g. by a root that holds the other private half).
    new_key(folder, 3, force=True)
    _, swapped = write_roster(folder, 4)
    assert swapped != sha256
    with pytest.raises(UserError, match=f"keys_roster_sha256: .* has SHA-256 {swapped}, "
                                        f"expected {sha256}"):
        load_identity(folder, 0, 4, sha256)
    # One byte more (a trailing comment that TOML ignores) is another roster too.
    with open(federation_keys / "roster.toml", "ab") as fh:
        fh.write(b"# harmless?\n")
    with pytest.raises(UserError, match="keys_roster_sha256"):
        read_roster(folder, 4, swapped)
    assert len(read_roster(folder, 4)) == 4  # not pinned: not checked
