"""Convnet throughput (LeNet-5, ResNet-8), mpifed against PyTorch DDP:
`python bench/cnn_throughput.py [--help]`.

The same as `mpifed bench cnn`; the code is mpifed/benchmarks/cnn_throughput.py.
"""

from mpifed.benchmarks.cnn_throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
