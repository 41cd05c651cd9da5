"""The one exception type for mistakes a user can make and fix.

The CLI prints its message (which names the thing and the fix) and exits with its ``exit_code``
(2, or 74 for a full disk: :class:`xcit_ssl.files.DiskFullError`), without a traceback. Raise it
for bad paths, unknown names, wrong checkpoints, corrupt inputs, NaN losses.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

    #: the CLI's exit code: 2 (bad input), distinct from a crash (1)
    exit_code: int = 2
    #: raised on every rank of a distributed run for one cause: only rank 0 prints it
    every_rank: bool = False
