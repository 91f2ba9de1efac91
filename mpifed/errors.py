"""Errors that a user can fix: printed as one line, without a traceback."""


class UserError(Exception):
    """An input the user gave is wrong; the message names the input and the fix."""
