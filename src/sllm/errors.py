"""Errors a user can fix: one sentence naming the problem and the fix, printed by the CLI on
one stderr line with exit code 2; programming errors stay exceptions with tracebacks.
"""


class UserError(Exception):
    """Bad input, a bad setting or a missing file: something the user can fix."""

    exit_code = 2
