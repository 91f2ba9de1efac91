"""Streamed and shuffled against in-memory shuffled training: `python bench/streaming.py [--help]`.

The same as `mpifed bench streaming`; the code is mpifed/benchmarks/streaming.py.
"""

from mpifed.benchmarks.streaming import main

if __name__ == "__main__":
    raise SystemExit(main())
