"""Config parsing: overrides, defaults, and errors that name the key."""

import pytest

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
