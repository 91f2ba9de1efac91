"""Split one dataset into institutions: IID, Dirichlet label skew, pathological, quantity skew.

What each scheme guarantees (every scheme gives every row to exactly one site):
    iid           a random permutation dealt in near-equal parts
    dirichlet     each class split over the sites by Dirichlet(alpha) shares; every site >= 2 rows
    pathological  each site holds at most C classes (C = classes_per_site); each class's rows are
                  split evenly among the sites that hold it
    sizes         site k gets fractions[k] of the rows, drawn at random

Each scheme is a pure function returning one array of row numbers per institution; the writer
puts them in OUT_DIR/site-<k>.h5 with the same `num_classes`, so that every site agrees on it.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from ..errors import UserError, check_output_path

SCHEMES = ("iid", "dirichlet", "pathological", "sizes")  # `mpifed data partition --scheme`


def iid_split(samples: int, sites: int, rng) -> list[np.ndarray]:
    """Deal a random permutation of the rows into `sites` parts of (nearly) equal size."""
    return [np.sort(part) for part in np.array_split(rng.permutation(samples), sites)]


def dirichlet_split(labels, sites: int, alpha: float, rng, min_size: int = 2,
                    tries: int = 1000) -> list[np.ndarray]:
    """Split each class over the sites by proportions drawn from Dirichlet(alpha).

    Small alpha gives strong label skew. Draws again until every site has `min_size` rows (as
    flwr-datasets does), and gives up with a clear error after `tries`.
    """
    classes = np.unique(labels)
    for _ in range(tries):
        parts = [[] for _ in range(sites)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise UserError(f"--alpha {alpha}: could not give every one of {sites} sites {min_size} rows "
                    f"in {tries} draws; raise --alpha or use fewer --institutions")


def pathological_split(labels, sites: int, classes_per_site: int, rng) -> list[np.ndarray]:
    """Give each site C classes, then split each class's rows among the sites that hold it.

    Guarantees: every site holds at most C distinct labels (exactly C where each of its classes
    has rows enough to go round); every row goes to exactly one site; each class is held by
    floor or ceil(sites * C / classes) sites, and its rows are split among them in near-equal
    parts. A shuffled class order is dealt round the sites C at a time (site k gets the C classes
    after site k-1's, wrapping around), as the FedAvg paper's sort-and-shard split intends, but
    without shards that straddle two classes when class sizes differ.
    """
    classes = rng.permutation(np.unique(labels))
    if classes_per_site > len(classes):
        raise UserError(f"--classes-per-site {classes_per_site}: the data has only "
                        f"{len(classes)} classes; use at most {len(classes)}")
    if sites * classes_per_site < len(classes):
        raise UserError(f"--classes-per-site {classes_per_site} with --institutions {sites} "
                        f"holds {sites * classes_per_site} of the {len(classes)} classes, so "
                        f"some rows would have no site; use --classes-per-site >= "
                        f"{-(-len(classes) // sites)}")
    holders: dict = {label: [] for label in classes}
    for site in range(sites):
        for slot in range(site * classes_per_site, (site + 1) * classes_per_site):
            holders[classes[slot % len(classes)]].append(site)
    parts = [[] for _ in range(sites)]
    for label, owners in holders.items():
        members = rng.permutation(np.flatnonzero(labels == label))
        for site, chunk in zip(owners, np.array_split(members, len(owners))):
            parts[site].append(chunk)
    out = [np.sort(np.concatenate(p)) for p in parts]
    empty = [site for site, rows in enumerate(out) if len(rows) == 0]
    if empty:
        raise UserError(f"--scheme pathological: site(s) {empty} got no rows (their classes have "
                        f"fewer rows than sites holding them); use fewer --institutions")
    return out


def sizes_split(samples: int, fractions, rng) -> list[np.ndarray]:
    """Quantity skew: site k gets fractions[k] of the rows, drawn at random (IID labels)."""
    fractions = np.asarray(fractions, dtype=float)
    if np.any(fractions <= 0) or abs(fractions.sum() - 1) > 1e-6:
        raise UserError(f"--sizes {','.join(map(str, fractions))}: need positive fractions that "
                        "sum to 1")
    cuts = (np.cumsum(fractions)[:-1] * samples).round().astype(int)
    return [np.sort(p) for p in np.split(rng.permutation(samples), cuts)]


def split(labels, sites: int, scheme: str, seed: int, alpha=0.5, classes_per_site=2,
          sizes=None) -> list[np.ndarray]:
    """Return the rows of each site under `scheme` (one of SCHEMES)."""
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    rng = np.random.default_rng(seed)
    if sites < 1:
        raise UserError(f"--institutions must be >= 1, got {sites}")
    if scheme == "iid":
        return iid_split(len(labels), sites, rng)
    if scheme == "dirichlet":
        if alpha <= 0:
            raise UserError(f"--alpha must be > 0, got {alpha}")
        return dirichlet_split(labels, sites, alpha, rng)
    if scheme == "pathological":
        if classes_per_site < 1:
            raise UserError(f"--classes-per-site must be >= 1, got {classes_per_site}")
        return pathological_split(labels, sites, classes_per_site, rng)
    if scheme == "sizes":
        if sizes is None or len(sizes) != sites:
            raise UserError(f"--scheme sizes needs --sizes with {sites} fractions, e.g. "
                            "--sizes 0.5,0.3,0.2")
        return sizes_split(len(labels), sizes, rng)
    raise UserError(f"--scheme {scheme!r}: use one of {', '.join(SCHEMES)}")


def check_partition_output(in_path: str, out_dir: str, parts, force: bool) -> list[str]:
    """Refuse a partition that would overwrite its input, write an empty site, or leave stale
    site files beside new ones (unless `force`); return the existing site files to remove."""
    check_output_path(out_dir, "out_dir", force, is_folder=True)
    for site, rows in enumerate(parts):
        if len(rows) == 0:
            raise UserError(f"--institutions {len(parts)}: site {site} would get no rows (the "
                            f"input has {sum(map(len, parts))}); use fewer institutions")
    existing = sorted(glob.glob(os.path.join(out_dir, "site-*.h5")))
    written = [os.path.join(out_dir, f"site-{k}.h5") for k in range(len(parts))]
    written.append(os.path.join(out_dir, "partition.csv"))
    source = os.path.realpath(in_path)
    if source in {os.path.realpath(p) for p in written + existing}:
        raise UserError(f"input {in_path!r} lies among the files the partition writes in "
                        f"{out_dir!r}; choose another out_dir")
    if existing and not force:
        raise UserError(f"out_dir {out_dir!r} already holds {len(existing)} site files; add "
                        "--force to replace them all, or choose another folder")
    return existing


def write_partition(in_path: str, out_dir: str, parts, x: str = "x", y: str = "y",
                    force: bool = False) -> list[str]:
    """Write OUT_DIR/site-<k>.h5 for each part and OUT_DIR/partition.csv; return the table lines.

    Reads the input's x and y whole: partitioning is a one-off preprocessing step on one machine.
    """
    import h5py  # here, not at the top: the command line reads SCHEMES without loading HDF5

    from .synth import write_arrays

    for stale in check_partition_output(in_path, out_dir, parts, force):
        os.remove(stale)
    with h5py.File(in_path, "r") as fh:
        features, labels = fh[x][...], fh[y][...]
        classes = int(fh.attrs.get("num_classes", labels.max() + 1))
        shape = fh.attrs.get("input_shape")
    os.makedirs(out_dir, exist_ok=True)
    counts = np.zeros((len(parts), classes), dtype=np.int64)
    for site, rows in enumerate(parts):
        write_arrays(os.path.join(out_dir, f"site-{site}.h5"), features[rows], labels[rows],
                     num_classes=classes, input_shape=shape)
        counts[site] = np.bincount(labels[rows], minlength=classes)
    header = ["site", "samples", *[f"class_{c}" for c in range(classes)]]
    rows = [[f"site-{s}", int(counts[s].sum()), *counts[s].tolist()] for s in range(len(parts))]
    with open(os.path.join(out_dir, "partition.csv"), "w") as fh:
        fh.write(",".join(header) + "\n")
        fh.writelines(",".join(map(str, r)) + "\n" for r in rows)
    width = max(6, *(len(str(v)) for r in rows for v in r))
    return [" ".join(f"{h:>{width}}" for h in header)] + [
        " ".join(f"{v:>{width}}" for v in r) for r in rows]
