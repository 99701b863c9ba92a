"""One exception type for mistakes a user can fix.

Stage code raises :class:`UserError` with a one-line message naming the file (and line) and
what is wrong; the CLI prints it as ``error: <message>`` and exits with status 2, never with a
traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad input, path or setting. The message is shown to the user as-is, on one line."""

