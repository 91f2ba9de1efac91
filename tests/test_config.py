"""Config parsing: overrides, defaults, and errors that name the key."""

import pytest
from conftest import run_cli

from mpifed.errors import UserError
from mpifed.train.config import load_config, parse_value, resolve, to_toml


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, '[data]\ntrain = "a.h5"\n[model]\nkind = "mlp"\nhidden = [8]\n')
    cfg = load_config(path, ["optim.lr=0.5", "model.hidden=[16, 4]", "run.out=somewhere",
                             "data.shuffle=false"])
    assert cfg["optim"]["lr"] == 0.5 and cfg["model"]["hidden"] == [16, 4]
    assert cfg["run"]["out"] == "somewhere" and cfg["data"]["shuffle"] is False
    assert cfg["optim"]["epochs"] == 1 and cfg["optim"]["batch_size"] == 32
    again = resolve(__import__("tomllib").loads(to_toml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("text,key", [
    ('[data]\ntrain = "a.h5"\nbogus = 1\n', "data.bogus"),
    ('[data]\ntrain = "a.h5"\n[optim]\nlr = "fast"\n', "optim.lr"),
    ('[data]\ntrain = "a.h5"\n[optim]\nlr = -1.0\n', "optim.lr"),
    ('[data]\ntrain = "a.h5"\n[optim]\nbatch_size = 0\n', "optim.batch_size"),
    ('[data]\ntrain = "a.h5"\n[optim]\nepochs = 2\nsteps = 5\n', "optim.epochs"),
    ('[data]\ntrain = "a.h5"\n[optim]\nname = "lbfgs"\n', "optim.name"),
    ('[data]\ntrain = "a.h5"\n[model]\nhidden = [0]\n', "model.hidden"),
    ('[data]\ntrain = "a.h5"\n[optim]\nbatch_size = true\n', "optim.batch_size"),
    ('[optim]\nlr = 0.1\n', "data.train"),
    ('[data]\ntrain = "a.h5"\n[wat]\nx = 1\n', "[wat]"),
])
def test_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(UserError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text))


def test_set_values_are_toml_or_bare_strings():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("ring") == "ring"
    assert parse_value('"a b"') == "a b"


def test_bad_set_syntax(tmp_path):
    with pytest.raises(UserError, match="section.key=value"):
        load_config(write(tmp_path, '[data]\ntrain = "a.h5"\n'), ["lr=0.1"])


def test_written_config_loads_back_the_same(tmp_path):
    """OUT/config.toml (to_toml, tomli-w) read by `mpifed train` gives the same config."""
    path = write(tmp_path, '[data]\ntrain = "sites/site-{institution}.h5"\n'
                           '[model]\nkind = "mlp"\nhidden = [16, 4]\n'
                           '[optim]\nsteps = 7\nlr = 1e-3\n[run]\nout = "a \\"quoted\\" dir"\n'
                           '[federated]\ninstitution_sizes = [1, 2]\nstrategy = "fedyogi"\n'
                           '[federated.dp]\nclip = 0.5\n')
    cfg = load_config(path)
    written = tmp_path / "config.toml"
    written.write_text(to_toml(cfg))
    assert load_config(str(written)) == cfg
    assert "[federated.dp]" in written.read_text() and "null" not in written.read_text()
    plain = load_config(write(tmp_path, '[data]\ntrain = "a.h5"\n'))
    assert plain["federated"] is None and "[federated]" not in to_toml(plain)


def test_choices_come_from_the_modules_that_implement_them():
    from mpifed.comm.collectives import ALGORITHMS
    from mpifed.data.partition import SCHEMES
    from mpifed.federated.strategies import STRATEGIES
    from mpifed.nn.spec import KINDS
    from mpifed.optim.optimizers import OPTIMIZERS
    from mpifed.optim.schedules import SCHEDULES
    from mpifed.train.config import CHOICES, describe_keys
    from mpifed.train.report import PROGRESS_MODES
    from mpifed.xp import BACKENDS

    assert CHOICES[("comm", "allreduce")] is ALGORITHMS
    assert CHOICES[("comm", "backend")] is BACKENDS
    assert CHOICES[("model", "kind")] is KINDS
    assert CHOICES[("optim", "name")] is OPTIMIZERS
    assert CHOICES[("optim", "schedule")] is SCHEDULES
    assert CHOICES[("run", "progress")] is PROGRESS_MODES
    assert CHOICES[("federated", "strategy")] == tuple(STRATEGIES)
    keys = describe_keys()
    for choices in (ALGORITHMS, BACKENDS, KINDS, OPTIMIZERS, SCHEDULES, PROGRESS_MODES):
        assert "/".join(choices) in keys
    assert "/".join(STRATEGIES) in keys and "[federated.dp]" in keys
    done = run_cli(["data", "partition", "--help"])
    assert "{" + ",".join(SCHEMES) + "}" in done.stdout


def test_train_help_lists_every_key():
    from mpifed.train.config import DP, FEDERATED, SCHEMA

    done = run_cli(["train", "--help"])
    assert done.returncode == 0, done.stderr
    sections = dict(SCHEMA, federated=FEDERATED, **{"federated.dp": DP})
    for section, keys in sections.items():
        assert f"[{section}]" in done.stdout
        for key, (types, _) in keys.items():
            if dict not in types:
                assert f"\n  {key} " in done.stdout, f"{section}.{key}"
