"""The PyTorch peers, shared by the CPU and GPU throughput benchmarks (torch is optional): the
benchmark MLP and the lenet5 and resnet presets of the layer library, and the torch DDP set-up
(process group from the MPI ranks, this rank's rows of the data set, the steps the harness
times)."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import numpy as np

from .harness import Steps, barrier_sync
from .mlp import SIZES


def free_port(comm) -> int:
    """Return a TCP port free on 127.0.0.1: rank 0 binds port 0 and broadcasts what it got."""
    port = None
    if comm.rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    return comm.bcast(port, root=0)


def join_torch_peers(comm, backend: str) -> None:
    """Start torch.distributed ("gloo" or "nccl") as rank comm.rank of comm.size, on one host."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port(comm)))
    dist.init_process_group(backend, rank=comm.rank, world_size=comm.size)


def rank_rows(data: str, comm, device=None):
    """Return (x, y): this rank's contiguous 1/comm.size of the HDF5 file's rows as torch tensors.

    data: HDF5 file with "x" (N, ...) and "y" (N,) class indices; y comes back as int64.
    device: torch device to move both to (None: stay on the CPU).
    """
    import h5py
    import torch

    with h5py.File(data) as fh:
        n = fh["x"].shape[0]
        lo, hi = comm.rank * n // comm.size, (comm.rank + 1) * n // comm.size
        x = torch.from_numpy(fh["x"][lo:hi])
        y = torch.from_numpy(fh["y"][lo:hi].astype(np.int64))
    return (x, y) if device is None else (x.to(device), y.to(device))


@contextmanager
def ddp_steps(ddp, x, y, batch: int, comm, gpu: bool):
    """Yield the harness Steps of SGD (lr 0.01, momentum 0.9) on `ddp`: step i trains on batch
    i mod (rows // batch) of (x, y); sync is the CUDA device (gpu) then a barrier over `comm`.
    Leave the torch process group afterwards."""
    import torch
    import torch.distributed as dist

    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    per_epoch = x.shape[0] // batch

    def step(i: int) -> None:
        k = i % per_epoch
        opt.zero_grad(set_to_none=True)
        loss_fn(ddp(x[k * batch:(k + 1) * batch]), y[k * batch:(k + 1) * batch]).backward()
        opt.step()

    try:
        yield Steps(step, barrier_sync(comm, torch.cuda.synchronize if gpu else None))
    finally:
        dist.destroy_process_group()


def torch_mlp(device=None):
    """Return the benchmark MLP (mlp.SIZES) as a torch Sequential (seeded, on `device`)."""
    import torch

    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(SIZES, SIZES[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])  # no ReLU after the last layer
    return model.to(device) if device is not None else model


def torch_lenet5(input_shape=(1, 28, 28), classes: int = 10, device=None):
    """Return mpifed's `lenet5` preset in torch (same layers, same order, seeded)."""
    import torch
    from torch import nn

    channels, h, w = input_shape
    side = [((s // 2 - 4) // 2) for s in (h, w)]  # after conv pad 2, pool, conv 5x5, pool
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * side[0] * side[1], 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, classes))
    return model.to(device) if device is not None else model


def torch_resnet(depth: int = 8, channels: int = 3, classes: int = 10, device=None):
    """Return mpifed's `resnet` preset in torch: conv 16@3x3, (depth-2)/6 basic blocks per stage
    of 16, 32, 64 channels, a 1x1 convolution (with bias, no norm) as the projection where the
    shape changes, batch norm, global average pooling, linear C. Convolutions keep their bias,
    as mpifed's do."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout))
            self.projection = (nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout
                               else None)

        def forward(self, x):
            skip = x if self.projection is None else self.projection(x)
            return torch.relu(self.body(x) + skip)

    torch.manual_seed(0)
    layers, cin = [nn.Conv2d(channels, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, cout in enumerate((16, 32, 64)):
        for block in range((depth - 2) // 6):
            layers.append(Block(cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes)]
    model = nn.Sequential(*layers)
    return model.to(device) if device is not None else model
