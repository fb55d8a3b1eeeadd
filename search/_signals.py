"""Clean stops on SIGINT (Ctrl-C) and SIGTERM.

Inside a trial's fine-tune a signal raises :class:`Interrupted` at once: the objective records
``fail_reason = "interrupted"`` and Optuna marks the trial FAIL, so nothing is left RUNNING.
Outside (sampling, storage writes) the signal is remembered and the search stops after the
current step, so no database write is cut in half. A second signal while one is pending raises
at once wherever the program is.

Example:
    >>> with GracefulStop() as stop:
    ...     stop.requested
    False
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator


class Interrupted(Exception):
    """The search was asked to stop by a signal. An ``Exception`` (not ``KeyboardInterrupt``)
    so that Lightning re-raises it instead of calling ``sys.exit`` from inside a trial."""


class SearchFailed(Exception):
    """A worker gave up: too many of its trials failed in a row (the message says why)."""


class GracefulStop:
    """Installs SIGINT/SIGTERM handlers for its ``with`` block (main thread only)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._in_trial = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        pending = self.requested
        self.signal_name = signal.Signals(signum).name
        if self._in_trial or pending:
            raise Interrupted(f"interrupted by {self.signal_name}")

    @contextmanager
    def trial_body(self) -> Iterator[None]:
        """The part of a trial that may be cut at any point (the fine-tune). A signal during it
        ends it with :class:`Interrupted`, at once or, where library code swallowed that, when
        the body returns."""
        if self.requested:
            raise Interrupted(f"interrupted by {self.signal_name}")
        self._in_trial = True
        try:
            yield
        finally:
            self._in_trial = False
        if self.requested:  # the handler's raise can land in code that catches Exception and go unseen
            raise Interrupted(f"interrupted by {self.signal_name}")

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
