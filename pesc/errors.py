"""The one exception type for user mistakes: the CLI prints it as a single line and exits non-zero."""


class PescError(ValueError):
    """Bad input from the user (a path, a setting, a file): the message says what and what to do."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (Hub errors add advice lines; ours print as one line)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
