"""Stopping a run on a signal: SIGINT (Ctrl-C), SIGTERM (`kill`, Slurm's time limit or `scancel`) and
SIGUSR1 (Slurm's warning before the time limit).

During start-up (building the model, the format warm-up, starting engines) there is nothing to save, so
`medvlm-r1 train` installs the handlers in immediate mode: the first signal stops the command at once. Once
the loop can checkpoint, `StopSignals.defer` switches to recording the request only: the loop stops at the next step
boundary, after it saved a checkpoint, by raising `StopRequested`. A second SIGINT or SIGTERM stops at once.

The immediate stop raises KeyboardInterrupt because it is the one exception that comes out of a
blocking `ray.get`/`ray.wait` unchanged: any other exception raised by a signal handler there
turns into a SystemError or a SystemExit(1). The command line reads the signal's exit code from
`StopSignals.last_signal`.

While the command cleans up (stopping Ray and its engines), `StopSignals.shield` keeps one further signal from
cutting the clean-up short: a scancel both signals the driver and makes the batch script forward a
SIGTERM, and an interrupted `ray.shutdown` leaves Ray's exit handler seconds of work past Slurm's KillWait.
One more signal after that still stops at once.

A SIGTERM within `ECHO_S` seconds of the previous one is the same request arriving twice, not a second
request: Slurm's scancel and time limit signal every process of the batch step, the driver included,
and the batch script forwards the signal it got to the driver as well. (A person's second Ctrl-C is a
SIGINT and keeps its meaning.)
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Optional

# 128 + the signal number of what the run was asked to stop by, as a shell reports a killed command.
# SIGUSR1 is Slurm's early warning of the same termination, hence SIGTERM's code.
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR1": 143}
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
ECHO_S = 2.0  # a SIGTERM this soon after the previous one repeats it


def exit_code_of(signame: str) -> int:
    return EXIT_CODES.get(signame, 1)


class StopRequested(Exception):
    """Raised at a step boundary (or between start-up phases) once a stop signal was received."""

    def __init__(self, signame: str, checkpoint: Optional[str]):
        self.signame, self.checkpoint = signame, checkpoint
        where = f"last checkpoint: {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"stopped by {signame}; {where}")

    @property
    def exit_code(self) -> int:
        return exit_code_of(self.signame)


class StopNow(KeyboardInterrupt):
    """A signal that ends the command at once (a second SIGINT/SIGTERM, or any with immediate=True)."""

    def __init__(self, signame: str):
        self.signame = signame
        super().__init__(f"stopped at once by {signame}")

    @property
    def exit_code(self) -> int:
        return exit_code_of(self.signame)


class StopSignals:
    """The stop signals this process received and how it acts on them. Signal handlers belong to the
    process, so the command line uses the one `SIGNALS`; the run skeleton and the controller are handed it
    (launcher/trainer.py:launch), and a test may hand them a fresh one and call `request` itself."""

    def __init__(self):
        self.requested_signal: Optional[str] = None  # the first signal received
        self.last: Optional[str] = None  # the most recent one (the one that forced an immediate stop)
        self.immediate = False
        self.installed = False
        self.shielded = False
        self.held: Optional[str] = None  # a signal received while shielded, not acted on
        self.last_sigterm = float("-inf")  # time.monotonic() of the previous SIGTERM
        self.previous: dict = {}  # the handlers found at the first install, put back by reset()

    def request(self, name: str) -> None:
        """Act on the stop signal `name` as the handler does (a second SIGINT or SIGTERM stops at once)."""
        if name == "SIGTERM":
            now, previous = time.monotonic(), self.last_sigterm
            self.last_sigterm = now
            if now - previous < ECHO_S:
                return  # the same stop, delivered both by Slurm and by the batch script
        self.last = name
        if self.shielded and self.held is None:
            self.held = name
            return
        if self.immediate or (self.requested_signal is not None and name in ("SIGINT", "SIGTERM")):
            self.shield()  # the clean-up that follows is kept from the next signal
            raise StopNow(name)
        if self.requested_signal is None:
            self.requested_signal = name

    def _handle(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)

    def install_handlers(self, immediate: bool = False) -> None:
        """Handle SIGINT, SIGTERM and SIGUSR1 in this (main) thread. With `immediate`, for a command that
        has nothing to save (evaluation), the first signal already stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return  # Python allows signal handlers in the main thread only
        self.immediate, self.installed = immediate, True
        for sig in _SIGNALS:
            previous = signal.signal(sig, self._handle)
            self.previous.setdefault(sig, signal.SIG_DFL if previous is None else previous)

    def defer(self) -> None:
        """From now on the first signal is only recorded, for the loop to act on at its next step boundary
        (after a checkpoint); a second SIGINT or SIGTERM still stops at once."""
        self.immediate = False

    def shield(self) -> None:
        """From now on (the command's clean-up) the next signal is held, not raised; one after it still is."""
        self.shielded = True

    def reinstall(self) -> None:
        """Put the handlers back after `ray.init`, which replaces the SIGTERM handler with its own (one
        that exits with code 1 or aborts). Does nothing where `install_handlers` was never called
        (a library use of the loop keeps its host's handlers)."""
        if self.installed:
            self.install_handlers(self.immediate)

    def requested(self) -> Optional[str]:
        """The name of the first stop signal received ("SIGTERM", ...), or None."""
        return self.requested_signal

    def last_signal(self) -> Optional[str]:
        """The name of the most recent stop signal received, or None."""
        return self.last

    def check(self, checkpoint: Optional[str] = None) -> None:
        """Raise StopRequested if a stop was requested: between start-up phases (no checkpoint yet), or at a
        step boundary with the checkpoint just written."""
        if self.requested_signal is not None:
            raise StopRequested(self.requested_signal, checkpoint)

    def reset(self) -> None:
        """Forget received signals and put back the handlers found at the first install (for tests)."""
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self.previous.items():
                signal.signal(sig, previous)
        self.__init__()


SIGNALS = StopSignals()  # this process's
