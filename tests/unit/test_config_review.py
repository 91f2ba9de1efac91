"""Inputs that `mpifed config validate` passed (or named unclearly) and `mpifed train` then
failed on: each now ends in one line naming the key and the fix."""

import pytest

from mpifed.config import load_config, resolve
from mpifed.errors import UserError

BASE = '[data]\ntrain = "a.h5"\n'


def load(tmp_path, text, overrides=()):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return load_config(str(path), list(overrides))


@pytest.mark.parametrize("text,message", [
    ('[data]\ntrain = ""\n', "data.train: required"),
    (BASE + '[run]\nout = ""\n', 'run.out: empty; set the output folder'),
    (BASE + '[run]\nresume = "neverr"\n', "run.resume: 'neverr' is neither a word nor a "
                                           "checkpoint path (did you mean 'never'?)"),
    (BASE + '[run]\nresume = "Auto"\n', "(did you mean 'auto'?)"),
])
def test_validate_refuses_what_train_would_refuse(tmp_path, text, message):
    with pytest.raises(UserError) as err:
        load(tmp_path, text)
    assert message in str(err.value)


def test_a_checkpoint_path_near_a_word_is_still_a_path(tmp_path):
    assert load(tmp_path, BASE + '[run]\nresume = "out/nevr.h5"\n').run.resume == "out/nevr.h5"


@pytest.mark.parametrize("text,message", [
    ("lr = 0.1\n" + BASE, "lr = 0.1: a key outside any section; put it under [optim]"),
    ("beta1 = 0.5\n" + BASE, "put it under [optim] or [federated]"),
    ("bogus = 1\n" + BASE, "bogus = 1: a key outside any section; no section has such a key"),
])
def test_a_key_outside_any_section_is_named_with_its_section(tmp_path, text, message):
    with pytest.raises(UserError) as err:
        load(tmp_path, text)
    assert message in str(err.value)


@pytest.mark.parametrize("raw,message", [
    ({"model": {"hidden": [8, "a"]}}, "model.hidden[1]: expected int, got str 'a'"),
    ({"federated": {"institution_sizes": [1, "2"]}},
     "federated.institution_sizes[1]: expected int, got str '2'"),
    ({"model": {"kind": "sequential", "layers": [{"type": "relu"}, 2]}},
     'model.layers[1]: expected a table with a type, e.g. {type = "relu"}, got int 2'),
    ({"federated": {"institutions": 2, "dp": False}},
     "federated.dp: expected a table, got bool False; write its keys under [federated.dp] "
     "(an empty table for the defaults), or remove it for no DP"),
    ({"data": 3}, "data: expected a table, got int 3; write its keys under [data]"),
])
def test_a_wrong_item_or_table_is_named_where_it_is(raw, message):
    raw = {"data": {"train": "a.h5"}, **raw}
    with pytest.raises(UserError) as err:
        resolve(raw)
    assert str(err.value) == message


def doc(section, key):
    from mpifed.config import ALL_SECTIONS

    return ALL_SECTIONS[section].declared()[key].metadata["doc"]


def test_descriptions_say_what_the_code_does():
    """Each phrase is what the consumer does (mpifed/train, mpifed/data): the timeline file,
    what a federation reads instead, the memory limit the shuffle buffer follows."""
    import inspect

    from mpifed.train import data_parallel, federated

    assert '"timeline.json"' in inspect.getsource(data_parallel)
    assert "timeline.json" in doc("run", "timeline")
    assert "eval_every" not in inspect.getsource(federated)  # every round is evaluated
    assert "a federation evaluates after every round" in doc("run", "eval_every")
    assert "a federation records every round" in doc("run", "log_every")
    assert "rounds in a federation" in doc("optim", "warmup")  # learning_rate(rnd, ...)
    assert "rounds in a federation" in doc("optim", "step_size")
    assert "MPIFED_SHARD_MEMORY_BYTES" in doc("data", "shuffle_buffer")
    assert "none: nothing" in doc("run", "progress")
