"""The one exception type that means "the user can fix this": the CLI prints it as one line."""


class SdloraError(Exception):
    """A problem with the user's input (a file, a value, a folder), worded to say what to do."""
