"""Errors a user can act on: the CLI prints their message (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input, config or state; the message names the file, key or value and what was expected."""
