"""Print the run.out that a config and its `--set` overrides name; print nothing if neither does.

    python -m mpifed.cli.run_out run.toml [--set section.key=value ...] [--debug]

jobs/train.sbatch asks this before it starts the ranks: a run.out written by the user wins, and
only without one does the job send the run to its own folder runs/<job name>-<job id>. A config
that cannot be read prints nothing here; `mpifed train` then reports the problem once.
"""

from __future__ import annotations

import argparse
import sys

from .output import emit


def named_out(config: str, overrides) -> str | None:
    """Return run.out as the file at `config` and `overrides` give it, or None if unnamed."""
    from ..config.overrides import read_raw
    from ..errors import UserError

    try:
        raw = read_raw(config, overrides)
    except (OSError, UserError):
        return None
    run = raw.get("run")
    out = run.get("out") if isinstance(run, dict) else None
    return out if isinstance(out, str) and out else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpifed.cli.run_out", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[])
    args, _ = parser.parse_known_args(argv)  # the rest is for mpifed train (--debug)
    out = named_out(args.config, args.set)
    if out is not None:
        emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
