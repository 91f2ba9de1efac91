"""The only traffic between institutions: each leader sends its model and its report to the root
and receives the new global model. Nothing else crosses an institution's boundary."""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import numpy as np
from mpi4py import MPI

from ..comm.backend import mpi_view
from ..comm.quiet import quiet_barrier
from ..xp import to_host

TAG_MODEL, TAG_META = 11, 12


@dataclass
class SiteReport:
    """What an institution says of its round besides its model (travels as float64[5])."""

    samples: float = 0.0  # n_k: the institution's training rows
    steps: float = 0.0  # tau_k: local steps taken this round
    loss: float = 0.0  # mean training loss over those steps
    local_loss: float = 0.0  # with federated.evaluate_local: its model on its own rows
    local_accuracy: float = 0.0

    def to_array(self) -> np.ndarray:
        """Return the report as one float64 vector (the wire format)."""
        return np.array(astuple(self), dtype=np.float64)

    @classmethod
    def from_array(cls, values) -> SiteReport:
        """Read a report back from its wire format."""
        return cls(*(float(v) for v in values))

    @classmethod
    def wire_size(cls) -> int:
        return len(fields(cls))


META_FIELDS = tuple(f.name for f in fields(SiteReport))


def send_to_root(fed, params, report: SiteReport) -> int:
    """On a participating leader other than the root: send params and report; return bytes sent."""
    host, meta = to_host(params), report.to_array()
    reqs = [fed.leaders.Isend(host, 0, TAG_MODEL), fed.leaders.Isend(meta, 0, TAG_META)]
    MPI.Request.Waitall(reqs)
    return host.nbytes + meta.nbytes


def collect_at_root(fed, params, report: SiteReport, chosen: list[int]):
    """On the root: return {institution: (params, SiteReport)} for the chosen ones, and bytes
    received."""
    wires, reqs, received = {}, [], 0
    for k in chosen:
        if k == fed.institution:
            wires[k] = (to_host(params).copy(), report.to_array())
            continue
        buf, info = np.empty(params.size, dtype=params.dtype), np.empty(SiteReport.wire_size())
        reqs += [fed.leaders.Irecv(buf, k, TAG_MODEL), fed.leaders.Irecv(info, k, TAG_META)]
        wires[k] = (buf, info)
        received += buf.nbytes + info.nbytes
    MPI.Request.Waitall(reqs)
    return {k: (p, SiteReport.from_array(m)) for k, (p, m) in wires.items()}, received


def broadcast_global(fed, params, site: bool = True) -> int:
    """Root -> leaders -> every rank of each site, in place; return bytes the root sent.

    MPI may route `leaders.Bcast` through other leaders (a tree), so a leader could alter the
    copy it passes on: under secure aggregation the next round's transcript binds the SHA-256
    of the model each leader, and each rank of its site holding the whole model, received
    (`private_aggregation.py`, `transcript.py`), and a difference refuses that round.
    Every rank first waits for the root's aggregation in a quiet barrier (no core held).
    site=False: to the leaders only (called on them alone, so no barrier; a sharded
    institution's leader then hands each rank its chunk)."""
    if site:
        quiet_barrier(fed.world)
    work, copy_back = mpi_view(params, fed.site)  # device arrays go through host memory
    if fed.leaders is not None:
        fed.leaders.Bcast(work, root=0)
    if site:
        fed.site.Bcast(work, root=0)
    copy_back()
    return params.nbytes * (len(fed.sizes) - 1) if fed.is_root else 0
