"""`mpifed data inspect FILE`: shapes, dtypes, attributes and class counts of a dataset file."""

from __future__ import annotations

import h5py
import numpy as np

from ..errors import UserError


def inspect_lines(path: str, y_name: str = "y") -> list[str]:
    """Return a description of every dataset in `path`, and the class counts of `y_name`."""
    try:
        fh = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as err:
        raise UserError(f"{path!r} is not a readable HDF5 file ({err})") from None
    lines = [f"{path}"]
    with fh:
        for key, value in fh.attrs.items():
            lines.append(f"  attribute {key} = {value}")

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                lines.append(f"  dataset {name}: shape {obj.shape}, dtype {obj.dtype}, "
                             f"chunks {obj.chunks}")

        fh.visititems(visit)
        if y_name in fh and fh[y_name].ndim == 1 and fh[y_name].dtype.kind in "iu":
            counts = np.zeros(0, dtype=np.int64)
            dy = fh[y_name]
            for lo in range(0, dy.shape[0], 1 << 20):  # streamed: fine for files of any size
                block = dy[lo:lo + (1 << 20)]
                if block.size and block.min() < 0:
                    lines.append(f"  {y_name} has negative labels")
                    return lines
                counts = np.pad(counts, (0, max(0, int(block.max(initial=-1)) + 1 - counts.size)))
                counts += np.bincount(block, minlength=counts.size)
            lines.append(f"  class counts of {y_name}: " +
                         ", ".join(f"{c}: {n}" for c, n in enumerate(counts)))
    return lines
