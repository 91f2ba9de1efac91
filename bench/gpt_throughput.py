"""GPT tokens/s, mpifed against PyTorch DDP over gloo:
`OMP_NUM_THREADS=1 mpiexec -n 2 python bench/gpt_throughput.py [--help]`.

The same as `mpifed bench gpt`; the code is mpifed/benchmarks/gpt_throughput.py.
"""

from mpifed.benchmarks.gpt_throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
