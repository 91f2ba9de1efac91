"""The README's and the docs pages' examples against the code: their TOML configs load, the files
and make targets they name exist."""

import re
from pathlib import Path

import pytest
from helpers import documentation

from mpifed.config.overrides import tomllib  # tomli before Python 3.11
from mpifed.train.config import load_config

ROOT = Path(__file__).resolve().parents[2]
README = documentation()  # README.md and the pages under docs/
TOML_BLOCKS = re.findall(r"```toml\n(.*?)```", README, re.S)


def test_the_readme_has_its_config_examples():
    assert len(TOML_BLOCKS) >= 4  # [data].., [model] sequential, [federated], privacy


@pytest.mark.parametrize("block", TOML_BLOCKS, ids=lambda b: b.splitlines()[0])
def test_every_toml_example_is_valid_toml_and_every_key_is_accepted(tmp_path, block):
    tomllib.loads(block)  # TOML 1.0: an inline table on one line only
    text = block if block.lstrip().startswith("[data]") else '[data]\ntrain = "d.h5"\n' + block
    if "institutions =" not in text:  # the privacy example shows only its own keys
        text = text.replace("[federated]\n", "[federated]\ninstitutions = 4\n", 1)
    path = tmp_path / "run.toml"
    path.write_text(text)
    cfg = load_config(str(path), ["optim.epochs=1"] if "epochs" not in text else [])
    given = tomllib.loads(text)
    for section, table in given.items():
        for key, value in table.items():
            if not isinstance(value, dict):  # a key the loader dropped or renamed is not accepted
                assert key in getattr(cfg, section).to_dict(), f"{section}.{key}"


def test_the_files_and_make_targets_it_names_exist():
    named = r"\b((?:bench|jobs|docs|tests)/[\w./-]+\.(?:py|sbatch|sh|md|log|json|png))"
    for path in set(re.findall(named, README)):
        assert (ROOT / path).exists(), path
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for target in set(re.findall(r"`make ([\w-]+)", README)):
        assert target in targets, f"make {target}"
