"""Compression over a slow link: `python bench/compression_link.py [--help]`.

The same as `mpifed bench compression`; the code is mpifed/benchmarks/compression_link.py.
"""

from mpifed.benchmarks.compression_link import main

if __name__ == "__main__":
    raise SystemExit(main())
