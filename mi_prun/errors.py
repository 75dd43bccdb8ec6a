"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input the user can fix: the message says what is wrong and what to do."""
