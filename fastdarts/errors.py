"""Errors that fastdarts raises for bad user input."""


class UsageError(ValueError):
    """Bad input from a user: a value that names what was wrong and what was expected.

    The CLI prints its message as one line and exits with status 2.
    """
