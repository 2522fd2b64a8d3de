"""One exception type for problems the user can fix: the CLIs print it as one line."""


class MTPDError(Exception):
    """Bad input or environment; the message names the problem and the fix."""
