"""Training throughput, mpifed vs PyTorch DDP: `python bench/train_throughput.py [--help]`."""

from mpifed.benchmarks.train_throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
