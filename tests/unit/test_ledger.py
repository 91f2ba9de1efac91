"""The privacy ledger's file: a torn last line is cut on open, a damaged earlier one refused,
prefixes hashed as written; the unamplified epsilon beside the amplified one."""

import hashlib
import json
from types import SimpleNamespace

import pytest

from mpifed.config import DPConfig
from mpifed.errors import UserError
from mpifed.federated.dp import epsilon
from mpifed.federated.ledger import PrivacyLedger, ledger_path, release_entry
from mpifed.train.federated_budget import epsilon_fields, open_ledger

DP = DPConfig(clip=1.0, noise_multiplier=1.5)


def three_releases(out) -> PrivacyLedger:
    ledger = PrivacyLedger(str(out))
    for r in range(3):
        ledger.append(release_entry(DP, r, 0.5, None))
    return ledger


def test_a_torn_last_line_is_cut_on_open_and_the_next_release_reads_back(tmp_path, capsys):
    path = three_releases(tmp_path).path
    torn = b'{"round": 4, "noise_multip'  # the crash came in the middle of the write
    with open(path, "ab") as fh:
        fh.write(torn)
    ledger = open_ledger(str(tmp_path), SimpleNamespace(institution=0))
    assert [e["round"] for e in ledger.entries] == [1, 2, 3] and ledger.cut == len(torn)
    err = capsys.readouterr().err
    assert path in err and f"{len(torn)} bytes" in err and "3 releases remain" in err
    ledger.append(release_entry(DP, 3, 0.5, None))  # round 4 again, on a line of its own
    again = PrivacyLedger(str(tmp_path))
    assert [e["round"] for e in again.entries] == [1, 2, 3, 4] and again.cut == 0


def test_a_damaged_line_before_the_last_is_refused_naming_the_file(tmp_path):
    path = three_releases(tmp_path).path
    lines = open(path).read().splitlines(keepends=True)
    lines[1] = lines[1][:10] + "\n"
    with open(path, "w") as fh:
        fh.writelines(lines)
    with pytest.raises(UserError, match=r"line 2 of the privacy ledger .*privacy-ledger.jsonl"
                                        r".* restore the file"):
        PrivacyLedger(str(tmp_path))


def test_the_prefix_hash_covers_the_lines_as_written(tmp_path):
    ledger = three_releases(tmp_path)
    raw = open(ledger.path, "rb").read()
    first_two = b"".join(raw.splitlines(keepends=True)[:2])
    assert ledger.prefix_sha256(2) == hashlib.sha256(first_two).hexdigest()
    assert PrivacyLedger(str(tmp_path)).prefix_sha256(2) == ledger.prefix_sha256(2)
    assert ledger.prefix_sha256(3) != ledger.prefix_sha256(2)


def test_other_leaders_keep_their_copy_in_their_institutions_folder(tmp_path):
    assert ledger_path(str(tmp_path)) == str(tmp_path / "privacy-ledger.jsonl")
    copy = PrivacyLedger(str(tmp_path), 2)
    copy.append(release_entry(DP, 0, 0.5, None))
    lines = (tmp_path / "institution-2" / "privacy-ledger.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1]


def test_the_unamplified_epsilon_counts_every_round_sent_at_q_1():
    secret = [release_entry(DP, r, 0.5, None) for r in range(4)]  # secure aggregation
    fields = epsilon_fields(DP, secret, 4)
    assert fields["epsilon"] == pytest.approx(epsilon(0.5, 1.5, 4, 1e-5), rel=1e-9)
    assert fields["epsilon_unamplified"] == pytest.approx(epsilon(1.0, 1.5, 4, 1e-5), rel=1e-9)
    assert fields["epsilon_unamplified"] > 1.5 * fields["epsilon"] and fields["releases"] == 4
    public = [release_entry(DP, r, 0.5, [0, 1][:1 + r % 2]) for r in range(4)]  # seen sending
    fields = epsilon_fields(DP, public, 2)
    assert fields["epsilon_unamplified"] == fields["epsilon"] == pytest.approx(
        epsilon(1.0, 1.5, 4, 1e-5), rel=1e-9)
