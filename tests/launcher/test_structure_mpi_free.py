"""The pure layers import no MPI: each imported in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["mpifed.nn", "mpifed.nn.models", "mpifed.nn.io",
                                    "mpifed.nn.layout", "mpifed.optim", "mpifed.xp",
                                    "mpifed.federated.strategies", "mpifed.federated.dp",
                                    "mpifed.federated.secagg", "mpifed.federated.transcript",
                                    "mpifed.federated.masked_sum", "mpifed.federated.dp_settings",
                                    "mpifed.federated.private_update", "mpifed.data.partition",
                                    "mpifed.train.environment", "mpifed.benchmarks.harness"])
def test_pure_layers_do_not_import_mpi(module):
    code = f"import sys, {module}; print('mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False", f"importing {module} imports mpi4py"
