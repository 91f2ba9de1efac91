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


SA = FED + "secure_aggregation = true\nmin_participants = 2\n"
DP_TABLE = "[federated.dp]\nclip = 1.0\nnoise_multiplier = 1.0\n"


def test_secure_aggregation_with_dp_needs_keys(tmp_path):
    """Without identity keys an active root can sit in the middle of every pair, so the
    ledger's root-proof epsilon would be false: refused at load, saying why and the fix."""
    with pytest.raises(UserError) as refused:
        load(tmp_path, SA + DP_TABLE)
    message = str(refused.value)
    assert message.startswith("federated.keys: secure aggregation with [federated.dp]")
    assert "in the middle of every pair" in message and "epsilon" in message
    assert "mpifed keys new" in message and "mpifed keys roster" in message
    cfg = load(tmp_path, SA + 'keys = "keys"\n' + DP_TABLE)  # with keys: accepted
    assert cfg.federated.keys == "keys" and cfg.federated.dp.clip == 1.0
    assert load(tmp_path, FED + DP_TABLE).federated.dp is not None  # DP alone: the root adds it


def test_secure_aggregation_without_keys_is_allowed_with_one_warning(tmp_path, capsys):
    cfg = load(tmp_path, SA)
    assert cfg.federated.secure_aggregation and not cfg.federated.keys
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "is unauthenticated" in err
    load(tmp_path, SA + 'keys = "keys"\n')
    assert "unauthenticated" not in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    ('keys_roster_sha256 = "' + "ab" * 32 + '"\n',
     "federated.keys_roster_sha256: pins the roster of federated.keys, which is not set"),
    ('keys = "k"\nkeys_roster_sha256 = "abc"\n',
     "federated.keys_roster_sha256: expected 64 hex digits"),
    ('keys = "k"\nkeys_roster_sha256 = "' + "g" * 64 + '"\n',
     "federated.keys_roster_sha256: expected 64 hex digits"),
])
def test_a_pinned_roster_hash_needs_keys_and_a_hash(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        load(tmp_path, SA + extra)


def test_a_pinned_roster_hash_loads(tmp_path):
    pinned = "0123456789abcdef" * 4
    cfg = load(tmp_path, SA + f'keys = "k"\nkeys_roster_sha256 = "{pinned}"\n' + DP_TABLE)
    assert cfg.federated.keys_roster_sha256 == pinned


def test_a_federation_names_the_keys_it_does_not_read(tmp_path, capsys):
    load(tmp_path, FED + "[run]\neval_every = 5\ntimeline = true\n[optim]\nsteps = 9\n")
    err = capsys.readouterr().err
    for key in ("run.eval_every = 5", "optim.steps = 9"):
        assert f"{key} is not read by a federation" in err, err
    assert "run.timeline" not in err  # a federation writes a trace per institution
    load(tmp_path, BASE + "[run]\ntimeline = true\n")  # a data-parallel run reads them
    assert "not read" not in capsys.readouterr().err


def test_hidden_is_refused_unless_the_model_is_an_mlp(tmp_path):
    for kind in ("softmax", "lenet5", "resnet"):
        with pytest.raises(UserError, match=r'model.hidden: only read when model.kind = "mlp"'):
            load(tmp_path, BASE + f'[model]\nkind = "{kind}"\nhidden = [8]\n')
    assert load(tmp_path, BASE + '[model]\nkind = "mlp"\nhidden = [8]\n').model.hidden == (8,)
