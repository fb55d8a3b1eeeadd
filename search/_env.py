"""Exit codes and environment variables of the ``slimtune`` command, in one place.

Example:
    >>> EXIT_BAD_INPUT, STORAGE_ENV
    (2, 'SLIMTUNE_STORAGE')
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2  # bad input (nothing written) or a database fault
EXIT_INTERRUPTED = 130  # a signal stopped it; the running trial is FAIL with reason "interrupted"
STORAGE_ENV = "SLIMTUNE_STORAGE"  # the storage URL, kept off the command line (it may hold a password)
TRACEBACK_ENV = "SLIMTUNE_TRACEBACK"  # "1": print the traceback of an unexpected error
RUN_ENV = "SLIMTUNE_RUN"  # the run id a parent gives its workers, so it counts the trials they ran
