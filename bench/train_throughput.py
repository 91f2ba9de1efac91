"""Training throughput, mpifed against PyTorch DDP: `python bench/train_throughput.py [--help]`.

The same as `mpifed bench throughput`; the code is mpifed/benchmarks/train_throughput.py.
"""

from mpifed.benchmarks.train_throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
