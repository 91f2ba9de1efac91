"""Institutions' long-term Ed25519 identity keys: making them, the roster, signing.

    mpifed keys new 2 keys/                         # institution 2, on its own machine:
                                                    # keys/site-2.key (0600), keys/site-2.pub
    mpifed keys roster keys/ --institutions 4       # from site-0.pub ... site-3.pub:
                                                    # keys/roster.toml, and its SHA-256
    mpifed keys generate keys/ --institutions 4     # tests and demos: one dealer, every key

A leader reads only its own private key (DIR/site-<k>.key) and the public roster
(DIR/roster.toml: `institutions = K`, `public_keys = [hex, ...]`, entry k for institution k).
Secure aggregation signs each round's X25519 key with it, so a root that relays keys cannot
substitute its own (Bonawitz et al. 2017, the protocol against an active adversary). With
`keys new` no machine ever holds another institution's private key; the roster is public, and
federated.keys_roster_sha256 pins the one the institutions agreed on, so a roster swapped on
the way to a leader (one public key replaced by the root's) is refused.
"""

from __future__ import annotations

import hashlib
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
PUBLIC_BYTES = 32


def key_path(folder: str, institution: int) -> str:
    return os.path.join(folder, f"site-{institution}.key")


def public_path(folder: str, institution: int) -> str:
    return os.path.join(folder, f"site-{institution}.pub")


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def _write_private(path: str, key: Ed25519PrivateKey) -> None:
    """Write `key` as unencrypted PKCS#8 PEM to a new file of mode 0600 (replacing `path`)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if os.path.exists(path):
        os.remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(path, 0o600)  # whatever the umask


def roster_bytes(public_keys: list[str]) -> bytes:
    """Return roster.toml's bytes for the public keys (hex, entry k for institution k)."""
    return tomli_w.dumps({"institutions": len(public_keys),
                          "public_keys": public_keys}).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _refuse_existing(command: str, paths: list[str], replaced: str) -> None:
    existing = [p for p in paths if os.path.exists(p)]
    if existing:
        raise UserError(f"keys {command}: {existing[0]!r} exists; choose another DIR or pass "
                        f"--force to replace {replaced}")


def generate_keys(folder: str, institutions: int, force: bool = False) -> list[str]:
    """Write one identity key per institution (mode 0600) and the roster; return the paths.

    One dealer makes every key, so its machine could sign as any institution (tests and
    demos); `new_key` on each institution's machine and `write_roster` do without.
    """
    if institutions < 1:
        raise UserError(f"--institutions: must be >= 1, got {institutions}")
    os.makedirs(folder, exist_ok=True)
    roster = os.path.join(folder, ROSTER)
    if not force:
        _refuse_existing("generate", [roster, *(key_path(folder, k)
                                                for k in range(institutions))],
                         "every key (the old ones stop working)")
    publics, written = [], []
    for k in range(institutions):
        key = Ed25519PrivateKey.generate()
        _write_private(key_path(folder, k), key)
        publics.append(_raw_public(key).hex())
        written.append(key_path(folder, k))
    with open(roster, "wb") as fh:
        fh.write(roster_bytes(publics))
    return [*written, roster]


def new_key(folder: str, institution: int, force: bool = False) -> str:
    """Write institution `institution`'s private key DIR/site-K.key (mode 0600) and its public
    key DIR/site-K.pub (64 hex digits and a newline); return the public key's hex."""
    if institution < 0:
        raise UserError(f"keys new: K must be >= 0 (institutions count from 0), got "
                        f"{institution}")
    os.makedirs(folder, exist_ok=True)
    private, public = key_path(folder, institution), public_path(folder, institution)
    if not force:
        _refuse_existing("new", [private, public], "this institution's key (the old one stops "
                         "working; the roster must be rebuilt)")
    key = Ed25519PrivateKey.generate()
    _write_private(private, key)
    text = _raw_public(key).hex()
    with open(public, "w") as fh:
        fh.write(text + "\n")
    return text


def read_public(path: str, institution: int) -> str:
    """Return the hex public key in `path` (a site-K.pub), checked to be an Ed25519 key."""
    fix = f"ask institution {institution} for its site-{institution}.pub again"
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise UserError(f"keys roster: cannot read {path!r} ({err}); {fix}") from None
    try:
        text = data.decode("ascii").strip().lower()
        raw = bytes.fromhex(text)
        if len(raw) != PUBLIC_BYTES:
            raise ValueError(f"{len(raw)} bytes")
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise UserError(f"keys roster: {path!r} is not an Ed25519 public key (expected "
                        f"{2 * PUBLIC_BYTES} hex digits, as `mpifed keys new` writes); "
                        f"{fix}") from None
    return text


def write_roster(folder: str, institutions: int) -> tuple[str, str]:
    """Write DIR/roster.toml from DIR/site-0.pub ... site-(N-1).pub; return (its path, the
    SHA-256 of its bytes). Missing or malformed files and a key listed twice are refused."""
    if institutions < 1:
        raise UserError(f"--institutions: must be >= 1, got {institutions}")
    paths = [public_path(folder, k) for k in range(institutions)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"keys roster: missing {', '.join(map(repr, missing))}; institution K "
                        "runs `mpifed keys new K DIR` on its own machine and sends its "
                        "DIR/site-K.pub")
    publics = [read_public(path, k) for k, path in enumerate(paths)]
    first, second = _duplicate(publics)
    if first is not None:
        raise UserError(f"keys roster: {paths[first]!r} and {paths[second]!r} hold the same "
                        "public key; each institution must make its own with `mpifed keys new`")
    data = roster_bytes(publics)
    path = os.path.join(folder, ROSTER)
    with open(path, "wb") as fh:
        fh.write(data)
    return path, sha256_hex(data)


def _duplicate(publics: list[str]) -> tuple[int | None, int | None]:
    """Return the first two institutions whose public keys are equal, else (None, None)."""
    seen: dict[str, int] = {}
    for k, public in enumerate(publics):
        if public.lower() in seen:
            return seen[public.lower()], k
        seen[public.lower()] = k
    return None, None


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


def read_roster(folder: str, institutions: int, sha256: str = "") -> list[Ed25519PublicKey]:
    """Return the public keys of DIR/roster.toml (UserError naming federated.keys if unusable).

    sha256: federated.keys_roster_sha256; when set, the roster's bytes must have that hash.
    """
    import tomllib

    path = os.path.join(folder, ROSTER)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise UserError(f"federated.keys: cannot read the roster {path!r} ({err}); write it with "
                        "mpifed keys roster DIR --institutions K") from None
    found = sha256_hex(data)
    if sha256 and found != sha256.lower():
        raise UserError(f"federated.keys_roster_sha256: the roster {path!r} has SHA-256 {found}, "
                        f"expected {sha256.lower()}; it is not the roster the institutions "
                        "agreed on: fetch that roster again (mpifed keys roster prints its "
                        "hash) or correct federated.keys_roster_sha256")
    try:
        publics = [bytes.fromhex(h) for h in tomllib.loads(data.decode())["public_keys"]]
        keys = [Ed25519PublicKey.from_public_bytes(raw) for raw in publics]
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise UserError(f"federated.keys: cannot read the roster {path!r} ({err}); write it with "
                        "mpifed keys roster DIR --institutions K") from None
    if len(keys) != institutions:
        raise UserError(f"federated.keys: the roster {path!r} lists {len(keys)} institutions, "
                        f"the run has {institutions}; generate keys for {institutions}")
    first, second = _duplicate([raw.hex() for raw in publics])
    if first is not None:
        raise UserError(f"federated.keys: the roster {path!r} lists the same public key for "
                        f"institutions {first} and {second}; rebuild it from each institution's "
                        "own key (mpifed keys new K DIR, then mpifed keys roster DIR)")
    return keys


def load_identity(folder: str, institution: int, institutions: int,
                  roster_sha256: str = "") -> Identity:
    """Read this leader's private key and the roster; check that they belong together, that
    no key is listed twice and, when `roster_sha256` is set, that the roster has that hash."""
    roster = read_roster(folder, institutions, roster_sha256)
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
