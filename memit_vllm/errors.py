"""The one exception family a user sees: the CLI turns these into a one-line message and exit 2."""


def one_line(text: str) -> str:
    """`text` with its control characters escaped (a newline in a file name split a message in two, and a log
    line with it), so every message a user or a log reads is one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class MemitError(Exception):
    """Bad input or state the user can fix; the message names the input and the fix. It reads as one line
    wherever it is shown (CLI, vLLM's log, an admin route's answer)."""

    def __str__(self) -> str:
        return one_line(super().__str__())
