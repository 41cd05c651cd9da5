"""The one exception type for mistakes a user can make and fix.

The CLI prints its message (which names the thing and the fix) and exits with code 2, without a
traceback. Raise it for bad paths, unknown names, wrong checkpoints, corrupt inputs, NaN losses.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""
