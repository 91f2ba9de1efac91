"""The typed configuration: loading, overrides, errors that name the key, and everything users
read about settings (help, reference page, JSON Schema, `mpifed config`) from one source."""

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import pytest
from helpers import documentation

from mpifed.config import (
    ALL_SECTIONS,
    CommConfig,
    Config,
    DataConfig,
    OptimConfig,
    load_config,
    parse_value,
    resolve,
    to_toml,
)
from mpifed.config.overrides import tomllib
from mpifed.config.render import json_schema, show_toml
from mpifed.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "docs" / "reference" / "config.schema.json"


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, '[data]\ntrain = "a.h5"\n[model]\nkind = "mlp"\nhidden = [8]\n')
    cfg = load_config(path, ["optim.lr=0.5", "model.hidden=[16, 4]", "run.out=somewhere",
                             "data.shuffle=false"])
    assert cfg.optim.lr == 0.5 and cfg.model.hidden == (16, 4)
    assert cfg.run.out == "somewhere" and cfg.data.shuffle is False
    assert cfg.optim.epochs == 1 and cfg.optim.batch_size == 32
    assert cfg.comm.stall_timeout == 600.0 and cfg.federated is None
    again = resolve(tomllib.loads(to_toml(cfg)))
    assert again == cfg


def test_sections_are_immutable_and_typed():
    cfg = resolve({"data": {"train": "a.h5"}, "optim": {"lr": 1}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 0.5
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.optim, OptimConfig)
    assert isinstance(cfg.comm, CommConfig) and isinstance(cfg.data, DataConfig)


def test_a_config_built_in_python_is_checked_like_a_file():
    with pytest.raises(UserError, match=r"optim\.lr: must be > 0"):
        OptimConfig(lr=-1)
    with pytest.raises(UserError, match=r"comm\.shard: 'zero4' is not one of"):
        CommConfig(shard="zero4")
    with pytest.raises(UserError, match=r"data\.train: required"):
        Config(data=DataConfig())
    ok = Config(data=DataConfig(train="a.h5"), optim=OptimConfig(steps=5))
    assert ok.optim.epochs is None and ok.optim.steps == 5


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
    ('[data]\ntrain = "a.h5"\n[federated]\ninstitutions = 2\nlocal_steps = "many"\n',
     "federated.local_steps"),
    ('[data]\ntrain = "a.h5"\n[federated]\ninstitutions = 2\nlocal_steps = 0\n',
     "federated.local_steps"),
])
def test_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(UserError, match=re.escape(key)):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text,message", [
    ('[data]\ntrain = "a.h5"\n[optim]\nlrr = 0.1\n',
     "optim.lrr: unknown key (did you mean 'lr'?); known keys of [optim]: name, lr,"),
    ('[data]\ntrain = "a.h5"\n[optm]\nlr = 0.1\n', "[optm]: unknown section (did you mean "
                                                    "'optim'?); known: data, model, optim,"),
    ('[data]\ntrain = "a.h5"\n[comm]\nallreduce = "rng"\n',
     "comm.allreduce: 'rng' is not one of ('auto', 'ring', 'mpi', 'hierarchical', 'nccl') "
     "(did you mean 'ring'?)"),
    ('[data]\ntrain = "a.h5"\n[federated]\ninstitutions = 2\n[federated.dp]\nclipp = 1\n',
     "federated.dp.clipp: unknown key (did you mean 'clip'?)"),
])
def test_a_near_miss_gets_a_suggestion_and_the_known_keys(tmp_path, text, message):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


def test_one_range_per_key_where_two_checks_disagreed(tmp_path):
    """federated.tau was >= 0 in one check and > 0 in another; comm.stall_timeout was 600 in
    the schema and 0 in the step's signature: now one declaration each."""
    base = '[data]\ntrain = "a.h5"\n[federated]\ninstitutions = 2\n'
    with pytest.raises(UserError, match=r"federated\.tau: must be > 0"):
        load_config(write(tmp_path, base), ["federated.tau=0"])
    field = CommConfig.declared()["stall_timeout"]
    assert field.default == 600.0 and CommConfig().stall_timeout == 600.0
    import inspect

    from mpifed.train import step

    assert "stall_timeout" not in inspect.signature(step.make_step).parameters


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
    assert plain.federated is None and "[federated]" not in to_toml(plain)


def every_key():
    for name, section in ALL_SECTIONS.items():
        for key, f in section.declared().items():
            if name != "federated" or key != "dp":
                yield name, key, f


def test_every_key_has_a_type_a_default_and_a_description():
    for name, key, f in every_key():
        assert f.metadata["doc"], f"{name}.{key} has no description"
        assert f.default is not None or f.metadata["required"] or "unset" in f.metadata["doc"], \
            f"{name}.{key}: an unset default must say what unset means"


def test_the_schema_defaults_are_the_loaders_defaults():
    schema = json_schema()["properties"]
    cfg = resolve({"data": {"train": "a.h5"}, "federated": {"institutions": 2, "dp": {}}})
    loaded = cfg.to_dict()
    for name, key, f in every_key():
        props = schema[name] if name != "federated.dp" else schema["federated"]["properties"]["dp"]
        entry = props["properties"][key]
        value = (loaded["federated"]["dp"] if name == "federated.dp" else loaded[name])[key]
        if "default" in entry:
            assert entry["default"] == value, f"{name}.{key}"
        else:  # unset, or derived from another key: the description says which
            assert f.default is None, f"{name}.{key}"


def shipped_configs():
    """Every configuration the project ships: the demo's, the README's and the docs pages'
    TOML blocks, the examples' files."""
    from mpifed.cli import demo

    texts = {"demo": demo.CONFIG.format(data="d", out="o"),
             "demo-convnet": demo.CONVNET.format(data="d", out="o", model=demo.CONVNET_MODEL),
             "demo-central": demo.CENTRAL.format(data="d", out="o", steps=5, every=1)}
    for strategy_model in (demo.MLP_MODEL, demo.CONVNET_MODEL):
        texts[f"demo-fed-{len(texts)}"] = demo.FEDERATED.format(
            data="d", out="o", name="f", rounds=3, local_steps=2, model=strategy_model)
    for i, block in enumerate(re.findall(r"```toml\n(.*?)```", documentation(), re.S)):
        text = block if block.lstrip().startswith("[data]") else '[data]\ntrain = "d"\n' + block
        if "[federated]" in text and "institutions =" not in text:
            text = text.replace("[federated]\n", "[federated]\ninstitutions = 4\n", 1)
        texts[f"readme-{i}"] = text
    for path in sorted(ROOT.glob("examples/**/*.toml")):
        texts[str(path.relative_to(ROOT))] = path.read_text()
    return texts


@pytest.mark.parametrize("name,text", shipped_configs().items(), ids=list(shipped_configs()))
def test_the_schema_accepts_every_shipped_configuration(name, text, tmp_path):
    raw = tomllib.loads(text)
    jsonschema.validate(raw, json.loads(SCHEMA.read_text()))
    load_config(write(tmp_path, text))  # and the loader agrees


@pytest.mark.parametrize("change,where", [
    ({"optim": {"lrr": 0.1}}, "lrr"),
    ({"bogus": {}}, "bogus"),
    ({"optim": {"lr": "fast"}}, "fast"),
    ({"optim": {"batch_size": 1.5}}, "1.5"),
    ({"comm": {"shard": "zero4"}}, "zero4"),
    ({"federated": {"institutions": 2, "dp": {"clip": -1}}}, "-1"),
])
def test_the_schema_rejects_unknown_keys_and_wrong_types(change, where):
    raw = {"data": {"train": "a.h5"}, **change}
    with pytest.raises(jsonschema.ValidationError, match=re.escape(where)):
        jsonschema.validate(raw, json.loads(SCHEMA.read_text()))
    with pytest.raises(UserError):
        resolve(raw)


def test_config_show_of_a_federation_prints_dp(tmp_path):
    path = write(tmp_path, '[data]\ntrain = "a.h5"\n[federated]\ninstitutions = 3\n'
                           '[federated.dp]\nclip = 0.5\n')
    cfg = load_config(path)
    text = show_toml(cfg)
    assert "[federated.dp]\nclip = 0.5\n" in text and "# clip_count_stddev is unset" in text
    assert resolve(tomllib.loads(text)) == cfg


def test_the_optimizers_defaults_are_the_configs():
    """One source: a bare SGD() or Adam() is what an [optim] section without keys builds."""
    import inspect

    from mpifed.optim.optimizers import SGD, Adam

    optim = OptimConfig()
    for cls, keys in ((SGD, ("momentum", "nesterov", "weight_decay")),
                      (Adam, ("beta1", "beta2", "eps", "weight_decay"))):
        defaults = inspect.signature(cls).parameters
        for key in keys:
            assert defaults[key].default == getattr(optim, key), f"{cls.__name__} {key}"
