"""Institutions as MPI rank groups: the split of the world, each group's leader, the root.

World ranks are cut into contiguous groups; `site` is an institution's communicator (its rank 0
is the leader), `leaders` joins the leaders (its rank k is institution k's leader, and world
rank 0, leader of institution 0, is the root that aggregates). World and site ranks are kept
apart by name: `world_rank`, `site_rank`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpi4py import MPI

from ..errors import UserError


def institution_sizes(fed, world_size: int) -> list[int]:
    """Return the rank count of each institution from `fed` (the FederatedConfig) and the
    world size."""
    if fed.institution_sizes is not None:
        sizes = list(fed.institution_sizes)
        if sum(sizes) != world_size:
            raise UserError(f"federated.institution_sizes: {sizes} adds up to {sum(sizes)} ranks, "
                            f"but the run has {world_size}; launch with -n {sum(sizes)} or change "
                            "the sizes")
        return sizes
    count = fed.institutions
    if count > world_size:
        raise UserError(f"federated.institutions: {count} institutions need at least {count} "
                        f"ranks, the run has {world_size}; launch with -n {count} or more")
    if world_size % count:
        raise UserError(f"federated.institutions: {world_size} ranks do not split into {count} "
                        "equal groups; use a multiple of it, or federated.institution_sizes")
    return [world_size // count] * count


@dataclass
class Federation:
    """This rank's place: its institution, the site and leaders communicators, the sizes."""

    world: MPI.Comm
    site: MPI.Comm
    leaders: MPI.Comm | None  # None on ranks that are not a leader
    institution: int
    sizes: list[int]

    @property
    def world_rank(self) -> int:
        return self.world.rank

    @property
    def site_rank(self) -> int:
        return self.site.rank

    @property
    def is_leader(self) -> bool:
        return self.site.rank == 0

    @property
    def is_root(self) -> bool:
        return self.world.rank == 0

    def free(self) -> None:
        self.site.Free()
        if self.leaders is not None:
            self.leaders.Free()


def make_federation(world, sizes: list[int]) -> Federation:
    """Split `world` into contiguous institutions of `sizes` ranks (collective over `world`)."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    institution = next(k for k, (lo, hi) in enumerate(bounds) if lo <= world.rank < hi)
    site = world.Split(institution, world.rank)
    leaders = world.Split(0 if site.rank == 0 else MPI.UNDEFINED, world.rank)
    return Federation(world, site, None if leaders == MPI.COMM_NULL else leaders, institution,
                      sizes)


def participants(count: int, fraction: float, seed: int, round_index: int) -> list[int]:
    """Return the sorted institutions that take part in a round (seeded: the same on all ranks)."""
    if fraction >= 1:
        return list(range(count))
    chosen = max(1, round(fraction * count))
    import numpy as np

    rng = np.random.default_rng([seed, round_index, 0x66726163])
    return sorted(rng.choice(count, size=chosen, replace=False).tolist())
