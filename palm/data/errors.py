"""The one exception type of the data pipeline."""


class DataError(Exception):
    """Bad input or a failed step. The message is one line: what is wrong, with which file or
    URL, and how to fix it. The command line prints it as `error: ...` and exits 1."""
