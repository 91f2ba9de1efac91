"""The README's and the docs pages' commands against the CLI: each answers --help."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import documentation

ROOT = Path(__file__).resolve().parents[2]
README = documentation()  # README.md and the pages under docs/


@pytest.mark.parametrize("command", sorted(set(re.findall(
    r"mpifed (bench (?:[a-z-]+)|data (?:[a-z-]+)|config (?:[a-z]+)|keys (?:[a-z]+)|train|evaluate|"
    r"info|plot|demo)\b",
    README))))
def test_every_mpifed_command_it_shows_answers_help(command):
    done = subprocess.run([sys.executable, "-m", "mpifed", *command.split(), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, (command, done.stderr)
