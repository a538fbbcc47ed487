"""The one exception type that reaches a user as a one-line message."""


class TransferkitError(Exception):
    """A problem with the user's input: the message names it and the fix.

    The CLI prints it on one line and exits non-zero; the Python API lets it propagate.
    """

    exit_code = 2
