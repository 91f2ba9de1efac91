"""GPU training throughput, mpifed against PyTorch CUDA eager and torch.autocast, for the MLP,
LeNet-5, ResNet-8 and ResNet-20 in fp32, fp16 and bf16 at batch 128: `python
bench/gpu_throughput.py [--help]`. Without CuPy or a CUDA device it says so and measures
nothing.

The same as `mpifed bench gpu`; the code is mpifed/benchmarks/gpu_throughput.py.
"""

from mpifed.benchmarks.gpu_throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
