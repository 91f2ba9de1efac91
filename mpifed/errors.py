"""Errors that a user can fix: printed as one line, without a traceback."""


class UserError(Exception):
    """An input the user gave is wrong; the message names the input and the fix."""


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Raise UserError when `nbytes` exceed this machine's physical memory, before allocating."""
    import os

    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return  # unknown here: let the allocation decide
    if nbytes > total:
        raise UserError(f"{what} needs about {nbytes:,} bytes ({nbytes / 2**30:,.1f} GiB), more "
                        f"than this machine's {total / 2**30:,.1f} GiB of memory; {fix}")


def check_output_path(path: str, flag: str, force: bool, is_folder: bool) -> None:
    """Refuse an output path of the wrong kind, or an existing one without --force."""
    import os

    if is_folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is an existing file; give a folder")
    if not is_folder and os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a folder; give a file name")
    if not is_folder and os.path.exists(path) and not force:
        raise UserError(f"{flag} {path!r} exists; add --force to replace it")
