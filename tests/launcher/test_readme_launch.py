"""The README's examples against the code: its TOML configs load, its files and targets exist."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("command", sorted(set(re.findall(
    r"mpifed (bench (?:[a-z-]+)|data (?:[a-z-]+)|config (?:[a-z]+)|keys (?:[a-z]+)|train|evaluate|"
    r"info|plot|demo)\b",
    README))))
def test_every_mpifed_command_it_shows_answers_help(command):
    done = subprocess.run([sys.executable, "-m", "mpifed", *command.split(), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, (command, done.stderr)
