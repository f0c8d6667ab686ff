"""The one exception type for user mistakes: the CLI prints it as a single line and exits non-zero."""


class PescError(ValueError):
    """Bad input from the user (a path, a setting, a file): the message says what and what to do."""
