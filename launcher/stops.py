"""Stop requests by signal: recorded by a handler, acted on by the training loop at a step boundary."""
from __future__ import annotations

import signal
from typing import Optional

_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR1": 143}
_requested: Optional[str] = None


class StopRequested(Exception):
    """The run stopped on a signal (after saving a checkpoint when it could)."""

    def __init__(self, signame: str, checkpoint: Optional[str]):
        where = f"; resume from {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped on {signame}{where}")
        self.signame, self.checkpoint = signame, checkpoint

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES.get(self.signame, 1)


def _record(signum, _frame) -> None:
    global _requested
    name = signal.Signals(signum).name
    if _requested is not None and name != "SIGUSR1":
        raise KeyboardInterrupt if name == "SIGINT" else SystemExit(_EXIT_CODES[name])
    _requested = name


def install_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _record)


def requested() -> Optional[str]:
    return _requested


def check(checkpoint: Optional[str] = None) -> None:
    if _requested is not None:
        raise StopRequested(_requested, checkpoint)


def reset() -> None:
    global _requested
    _requested = None
