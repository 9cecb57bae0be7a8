"""The one exception type that means "the user can fix this": the CLI prints it as one line."""

import unicodedata


class SdloraError(Exception):
    """A problem with the user's input (a file, a value, a folder), worded to say what to do."""


def printable(text: str) -> str:
    """`text` with control and invisible characters (newline, ESC, NUL, U+202E ...) escaped, so
    a file name or value shown in a message cannot break its line or disguise itself."""
    return "".join(_escaped(c) if _hidden(c) else c for c in text)


def _hidden(c: str) -> bool:
    category = unicodedata.category(c)
    return category[0] == "C" or category in ("Zl", "Zp")


def _escaped(c: str) -> str:
    return c.encode("unicode_escape").decode("ascii")
