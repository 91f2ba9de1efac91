"""A federation's settings without MPI: local steps per round and the server step size."""

from __future__ import annotations

from mpifed.config import FederatedConfig
from mpifed.federated.strategies import DEFAULT_SERVER_LR, STRATEGIES
from mpifed.train.federated_site import local_step_count


def test_local_steps_per_round_from_each_setting():
    per_epoch = 7  # this institution's steps per local epoch
    assert local_step_count(FederatedConfig(institutions=2, local_steps=10), per_epoch) == 10
    assert local_step_count(FederatedConfig(institutions=2, local_steps="proportional"),
                            per_epoch) == 7
    assert local_step_count(FederatedConfig(institutions=2, local_epochs=3), per_epoch) == 21
    assert local_step_count(FederatedConfig(institutions=2), per_epoch) == 1  # the default


def test_server_lr_defaults_to_one_and_to_a_tenth_for_the_adaptive_servers():
    adaptive = {"fedadam", "fedyogi", "fedadagrad"}
    for name in STRATEGIES:
        assert DEFAULT_SERVER_LR.get(name, 1.0) == (0.1 if name in adaptive else 1.0), name
        step = FederatedConfig(institutions=2, strategy=name).server_step
        assert step == (0.1 if name in adaptive else 1.0), name
    assert FederatedConfig(institutions=2, strategy="fedadam", server_lr=0.5).server_step == 0.5
