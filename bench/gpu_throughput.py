"""GPU training throughput, mpifed against PyTorch: `python bench/gpu_throughput.py [--help]`.

The same as `mpifed bench gpu`; the code is mpifed/benchmarks/gpu_throughput.py.
"""

from mpifed.benchmarks.gpu_throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
