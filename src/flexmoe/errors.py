"""One error type for anything a user got wrong; the CLI turns it into one line and exit code 2."""


class FlexmoeError(Exception):
    """Bad input or a failed check. The message is shown to the user as a single line."""

    exit_code = 2
