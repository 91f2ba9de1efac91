"""Config hardening: every float finite and in range, `--set` at any depth, nonsense refused."""

import math

import pytest

from mpifed.errors import UserError
from mpifed.train.config import load_config

BASE = '[data]\ntrain = "a.h5"\n'
FED = BASE + "[federated]\ninstitutions = 2\n"
DP = FED + "[federated.dp]\nclip = 1.0\nnoise_multiplier = 1.0\nmax_epsilon = 2.0\n"


def load(tmp_path, text, overrides=()):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return load_config(str(path), list(overrides))


@pytest.mark.parametrize("assignment", [
    *[f"federated.dp.{k}={v}" for k in ("clip", "noise_multiplier", "max_epsilon", "delta",
                                        "target_quantile", "clip_lr", "clip_count_stddev")
      for v in ("nan", "inf")],
    *[f"federated.{k}={v}" for k in ("secure_range", "mu", "server_lr", "beta1", "beta2", "tau",
                                     "fraction") for v in ("nan", "inf", "-inf")],
    *[f"optim.{k}={v}" for k in ("momentum", "weight_decay", "gamma", "beta1", "beta2", "eps")
      for v in ("nan", "inf")],
    "optim.gamma=-0.5", "optim.gamma=0", "optim.eps=0", "optim.eps=-1e-8", "federated.tau=0",
])
def test_every_float_is_finite_and_in_range(tmp_path, assignment):
    key = assignment.split("=")[0]
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load(tmp_path, DP, [assignment])


def test_set_reaches_nested_tables_and_merges(tmp_path):
    cfg = load(tmp_path, DP, ["federated.dp.clip=0.5"])
    assert cfg.federated.dp.clip == 0.5 and cfg.federated.dp.max_epsilon == 2.0
    cfg = load(tmp_path, DP, ["federated.dp={clip=0.25}"])
    assert (cfg.federated.dp.clip, cfg.federated.dp.max_epsilon,
            cfg.federated.dp.noise_multiplier) == (0.25, 2.0, 1.0)
    cfg = load(tmp_path, FED, ["federated.dp.noise_multiplier=2"])
    assert cfg.federated.dp.noise_multiplier == 2 and cfg.federated.dp.clip == 1
    with pytest.raises(UserError, match=r"federated\.dp\.bogus"):
        load(tmp_path, DP, ["federated.dp.bogus=1"])
    with pytest.raises(UserError, match="not a table"):
        load(tmp_path, DP, ["data.train.x=1"])


def test_keys_the_strategy_ignores_are_named(tmp_path, capsys):
    load(tmp_path, FED + "server_lr = 0.5\nmu = 0.1\n")
    err = capsys.readouterr().err
    assert "federated.server_lr = 0.5 is ignored by strategy 'fedavg'" in err
    assert "federated.mu = 0.1 is ignored" in err
    load(tmp_path, FED.replace("institutions", 'strategy = "fedprox"\ninstitutions') + "mu = 0.1\n")
    assert "ignored" not in capsys.readouterr().err


@pytest.mark.parametrize("extra,key", [
    ("[run]\neval_every = 5\n", "run.eval_every"),
    ("[run]\nseed = -1\n", "run.seed"),
    ("[federated]\ninstitutions = 2\n[federated.dp]\nnoise_multiplier = 0\nmax_epsilon = 1.0\n",
     "federated.dp.max_epsilon"),
    ('[run]\nresume = ""\n', '"auto", "never"'),
])
def test_nonsense_is_refused(tmp_path, extra, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load(tmp_path, BASE + extra)


def test_config_path_that_is_a_folder_or_not_utf8(tmp_path):
    with pytest.raises(UserError, match="cannot be read"):
        load_config(str(tmp_path))
    (tmp_path / "bad.toml").write_bytes(b'[data]\ntrain = "\xff\xfe"\n')
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(str(tmp_path / "bad.toml"))


def test_finite_defaults_still_load(tmp_path):
    cfg = load(tmp_path, DP)
    assert all(math.isfinite(v) for v in cfg.federated.dp.to_dict().values()
               if isinstance(v, float))
