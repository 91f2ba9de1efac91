"""Institutions' long-term Ed25519 identity keys: `mpifed keys generate`, the roster, signing.

    mpifed keys generate keys/ --institutions 4    # keys/site-0.key ... (mode 0600), keys/roster.toml

A leader reads only its own private key (DIR/site-<k>.key) and the public roster
(DIR/roster.toml: `institutions = K`, `public_keys = [hex, ...]`, entry k for institution k).
Secure aggregation signs each round's X25519 key with it, so a root that relays keys cannot
substitute its own (Bonawitz et al. 2017, the protocol against an active adversary).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import tomli_w
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import UserError

ROSTER = "roster.toml"
SIGNATURE_BYTES = 64


def key_path(folder: str, institution: int) -> str:
    return os.path.join(folder, f"site-{institution}.key")


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def generate_keys(folder: str, institutions: int, force: bool = False) -> list[str]:
    """Write one identity key per institution (mode 0600) and the roster; return the paths."""
    if institutions < 1:
        raise UserError(f"--institutions: must be >= 1, got {institutions}")
    os.makedirs(folder, exist_ok=True)
    roster = os.path.join(folder, ROSTER)
    existing = [p for p in [roster, *(key_path(folder, k) for k in range(institutions))]
                if os.path.exists(p)]
    if existing and not force:
        raise UserError(f"keys generate: {existing[0]!r} exists; choose another DIR or pass "
                        "--force to replace every key (the old ones stop working)")
    publics, written = [], []
    for k in range(institutions):
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path = key_path(folder, k)
        if os.path.exists(path):
            os.remove(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        os.chmod(path, 0o600)  # whatever the umask
        publics.append(_raw_public(key).hex())
        written.append(path)
    with open(roster, "wb") as fh:
        tomli_w.dump({"institutions": institutions, "public_keys": publics}, fh)
    return [*written, roster]


@dataclass
class Identity:
    """One leader's signing key and every institution's public identity key."""

    institution: int
    signing: Ed25519PrivateKey
    roster: list[Ed25519PublicKey]

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of `message` by this institution."""
        return self.signing.sign(message)

    def verify(self, institution: int, signature: bytes, message: bytes) -> bool:
        """Tell whether `signature` is `institution`'s over `message`."""
        try:
            self.roster[institution].verify(bytes(signature), message)
            return True
        except InvalidSignature:
            return False


def read_roster(folder: str, institutions: int) -> list[Ed25519PublicKey]:
    """Return the public keys of DIR/roster.toml (UserError naming federated.keys if unusable)."""
    import tomllib

    path = os.path.join(folder, ROSTER)
    try:
        with open(path, "rb") as fh:
            roster = tomllib.load(fh)
        keys = [Ed25519PublicKey.from_public_bytes(bytes.fromhex(h))
                for h in roster["public_keys"]]
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise UserError(f"federated.keys: cannot read the roster {path!r} ({err}); write it with "
                        "mpifed keys generate DIR --institutions K") from None
    if len(keys) != institutions:
        raise UserError(f"federated.keys: the roster {path!r} lists {len(keys)} institutions, "
                        f"the run has {institutions}; generate keys for {institutions}")
    return keys


def load_identity(folder: str, institution: int, institutions: int) -> Identity:
    """Read this leader's private key and the roster; check that they belong together."""
    roster = read_roster(folder, institutions)
    path = key_path(folder, institution)
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as fh:
            key = serialization.load_pem_private_key(fh.read(), password=None)
    except (OSError, ValueError) as err:
        raise UserError(f"federated.keys: cannot read institution {institution}'s key {path!r} "
                        f"({err})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"federated.keys: {path!r} can be read by others (mode "
                        f"{stat.S_IMODE(mode):o}); chmod 600 it")
    if not isinstance(key, Ed25519PrivateKey) or _raw_public(key) != roster[institution] \
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw):
        raise UserError(f"federated.keys: {path!r} is not the key the roster lists for "
                        f"institution {institution}; regenerate the keys")
    return Identity(institution, key, roster)
