"""`mpifed keys generate` from the command line: private keys 0600 and a public roster."""

import os
import stat
import subprocess
import sys

import pytest

from mpifed.config.overrides import tomllib  # tomli before Python 3.11
from mpifed.errors import UserError
from mpifed.federated.identity import load_identity


def test_keys_generate_writes_private_keys_0600_and_a_public_roster(tmp_path):
    old = os.umask(0o022)  # a umask that would leave new files readable by all
    try:
        done = subprocess.run([sys.executable, "-m", "mpifed", "keys", "generate",
                               str(tmp_path / "k"), "--institutions", "3"],
                              capture_output=True, text=True, timeout=120)
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "k").iterdir())
    assert names == ["roster.toml", "site-0.key", "site-1.key", "site-2.key"]
    for k in range(3):
        assert stat.S_IMODE(os.stat(tmp_path / "k" / f"site-{k}.key").st_mode) == 0o600
        identity = load_identity(str(tmp_path / "k"), k, 3)  # its key matches the roster
        assert identity.institution == k
    roster = tomllib.loads((tmp_path / "k" / "roster.toml").read_text())
    assert roster["institutions"] == 3 and len(set(roster["public_keys"])) == 3
    os.chmod(tmp_path / "k" / "site-1.key", 0o644)
    with pytest.raises(UserError, match="can be read by others"):
        load_identity(str(tmp_path / "k"), 1, 3)
