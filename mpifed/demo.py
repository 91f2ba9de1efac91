"""`make demo`: the main job on a default that needs no cluster and no GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    mpiexec = Path(sys.executable).with_name("mpiexec")
    cmd = [str(mpiexec), "-n", "2", sys.executable, "-m", "mpifed", "info"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    cmd = [str(mpiexec), "-n", "2", sys.executable, "-m", "mpifed", "bench", "allreduce",
           "-b", "1K", "-e", "16M", "-f", "16"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    print("Training (mpifed train) lands with issue 3; this demo shows the collectives it uses.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
