"""The one exception family a user sees: the CLI turns these into a one-line message and exit 2."""


class MemitError(Exception):
    """Bad input or state the user can fix; the message names the input and the fix."""
