"""The typed configuration: loading, overrides, errors that name the key, and everything users
read about settings (help, reference page, JSON Schema, `mpifed config`) from one source."""

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import run_cli

from mpifed.config import (
    ALL_SECTIONS,
    load_config,
    resolve,
)
from mpifed.config.overrides import tomllib
from mpifed.config.render import describe_keys, json_schema, reference_markdown

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference" / "configuration.md"
SCHEMA = ROOT / "docs" / "reference" / "config.schema.json"


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_choices_come_from_the_modules_that_implement_them():
    from mpifed.comm.collectives import ALGORITHMS
    from mpifed.data.partition import SCHEMES
    from mpifed.federated.strategies import STRATEGIES
    from mpifed.nn.spec import CONFIG_KINDS, KINDS
    from mpifed.optim.optimizers import OPTIMIZERS
    from mpifed.optim.schedules import SCHEDULES
    from mpifed.train.report import PROGRESS_MODES
    from mpifed.train.sharded_step import STAGES, STEPS
    from mpifed.xp import BACKENDS

    def choices(section, key):
        return ALL_SECTIONS[section].declared()[key].metadata["choices"]

    assert choices("comm", "allreduce") is ALGORITHMS and choices("comm", "shard") is STAGES
    assert tuple(STEPS) == STAGES  # the step registry serves exactly the names the config takes
    assert choices("comm", "backend") is BACKENDS and choices("model", "kind") is CONFIG_KINDS
    assert choices("optim", "name") is OPTIMIZERS and choices("optim", "schedule") is SCHEDULES
    assert choices("run", "progress") is PROGRESS_MODES
    assert choices("federated", "strategy") == tuple(STRATEGIES)
    keys = describe_keys()
    for words in (ALGORITHMS, BACKENDS, KINDS, OPTIMIZERS, SCHEDULES, PROGRESS_MODES):
        assert " | ".join(words) in keys
    assert " | ".join(STRATEGIES) in keys and "[federated.dp]" in keys
    done = run_cli(["data", "partition", "--help"])
    assert "{" + ",".join(SCHEMES) + "}" in done.stdout


def every_key():
    for name, section in ALL_SECTIONS.items():
        for key, f in section.declared().items():
            if name != "federated" or key != "dp":
                yield name, key, f


def test_train_help_lists_every_key_with_its_default_and_description():
    done = run_cli(["train", "--help"])
    assert done.returncode == 0, done.stderr
    for name in ALL_SECTIONS:
        assert f"[{name}]" in done.stdout
    for name, key, f in every_key():
        assert re.search(rf"\n  {key} +.*\n +{re.escape(f.metadata['doc'][:30])}", done.stdout), \
            f"{name}.{key}"
    assert re.search(r"\n  stall_timeout +float >= 0 +600\.0\n", done.stdout)


def test_the_committed_reference_and_schema_are_current():
    """Regenerate both; a change to sections.py without `make docs-reference` fails here."""
    assert REFERENCE.read_text() == reference_markdown(), \
        "run: python -m mpifed config reference > docs/reference/configuration.md"
    assert json.loads(SCHEMA.read_text()) == json_schema(), \
        "run: python -m mpifed config schema > docs/reference/config.schema.json"
    done = run_cli(["config", "schema"])
    assert done.returncode == 0 and done.stdout == SCHEMA.read_text()


def test_config_show_prints_every_key_without_mpi(tmp_path):
    from mpifed.cli import demo

    path = write(tmp_path, demo.CONFIG.format(data="d", out="o"))
    code = ("import sys; from mpifed.cli.main import main; rc = main(sys.argv[1:]); "
            "assert 'mpi4py.MPI' not in sys.modules, 'MPI was imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "config", "show", path,
                           "--set", "optim.lr=0.25"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    shown = tomllib.loads(done.stdout)
    cfg = load_config(path, ["optim.lr=0.25"])
    for name, key, _ in every_key():
        if name.startswith("federated"):
            continue
        value = getattr(getattr(cfg, name), key)
        if value is None:
            assert f"# {key} is unset" in done.stdout, f"{name}.{key}"
        else:
            assert shown[name][key] == json.loads(json.dumps(cfg.to_dict()))[name][key]
    assert shown["optim"]["lr"] == 0.25 and shown["comm"]["stall_timeout"] == 600.0
    assert "# [federated] is not set" in done.stdout
    assert resolve(shown) == cfg  # what it prints loads back to the same configuration


def test_config_validate_exits_0_or_1_with_the_message(tmp_path):
    good = write(tmp_path, '[data]\ntrain = "a.h5"\n')
    done = run_cli(["config", "validate", good])
    assert done.returncode == 0 and "valid" in done.stdout
    done = run_cli(["config", "validate", good, "--set", "optim.momentum=1.5"])
    assert done.returncode == 1
    assert done.stderr.strip() == "mpifed: error: optim.momentum: must be in [0, 1), got 1.5"
    assert "Traceback" not in done.stderr
