"""The only traffic between institutions: each leader sends its model to the root and receives
the new global model. Nothing else crosses an institution's boundary."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ..comm.backend import mpi_view
from ..xp import to_host

META_FIELDS = ("samples", "steps", "loss", "local_loss", "local_accuracy")
TAG_MODEL, TAG_META = 11, 12


def send_to_root(fed, params, meta: np.ndarray) -> int:
    """On a participating leader other than the root: send params and meta; return bytes sent."""
    host = to_host(params)
    reqs = [fed.leaders.Isend(host, 0, TAG_MODEL), fed.leaders.Isend(meta, 0, TAG_META)]
    MPI.Request.Waitall(reqs)
    return host.nbytes + meta.nbytes


def collect_at_root(fed, params, meta: np.ndarray, chosen: list[int]):
    """On the root: return {institution: (params, meta)} for the chosen ones, and bytes received."""
    results, reqs, received = {}, [], 0
    for k in chosen:
        if k == fed.institution:
            results[k] = (to_host(params).copy(), meta.copy())
            continue
        buf, info = np.empty(params.size, dtype=params.dtype), np.empty_like(meta)
        reqs += [fed.leaders.Irecv(buf, k, TAG_MODEL), fed.leaders.Irecv(info, k, TAG_META)]
        results[k] = (buf, info)
        received += buf.nbytes + info.nbytes
    MPI.Request.Waitall(reqs)
    return results, received


def broadcast_global(fed, params) -> int:
    """Root -> leaders -> every rank of each site, in place; return bytes the root sent."""
    work, copy_back = mpi_view(params, fed.site)  # device arrays go through host memory
    if fed.leaders is not None:
        fed.leaders.Bcast(work, root=0)
    fed.site.Bcast(work, root=0)
    copy_back()
    return params.nbytes * (len(fed.sizes) - 1) if fed.is_root else 0
