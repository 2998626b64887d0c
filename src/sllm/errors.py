"""Errors a user can fix.

A `UserError` carries one sentence that names the problem and the fix. The CLI prints it on
one line to stderr and exits with code 2, without a traceback; programming errors stay
ordinary exceptions so their tracebacks reach us.
"""


class UserError(Exception):
    """Bad input, a bad setting or a missing file: something the user can fix."""

    exit_code = 2
