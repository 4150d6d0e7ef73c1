"""One handle for fanning out to a set of Ray actors of one kind (learner ranks, rollout workers).

Every remote call of the driver goes through here, so every failure looks the same: an `ActorFailure`
naming the actor, its kind and index, and what the step was doing. A dead actor is reported as soon as
it dies (its peers may still be blocked in a collective waiting for it); a call past its deadline is a
failure too, so a stuck actor cannot hang the run.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Optional, Sequence

import ray

log = logging.getLogger(__name__)


class ActorFailure(RuntimeError):
    """A call to one actor of the run failed; `kind` and `index` say which actor."""

    def __init__(self, message: str, kind: str, index: int):
        super().__init__(message)
        self.kind, self.index = kind, index


class ActorDiedError(ActorFailure):
    """The actor's process died mid-call."""


class ActorTimeoutError(ActorFailure):
    """The call did not return within its deadline (the actor or something it waits on is stuck)."""


class ActorCallError(ActorFailure):
    """The actor is alive but its method raised; the message carries the actor's own error."""


@dataclasses.dataclass
class Calls:
    """Submitted remote calls: the kind and index of the actor behind each."""

    futures: list
    kinds: list[str]
    indices: list[int]

    def __add__(self, other: "Calls") -> "Calls":
        return Calls(self.futures + other.futures, self.kinds + other.kinds, self.indices + other.indices)

    def wait(self, doing: str, timeout_s: Optional[float] = None) -> list:
        """Results in submission order; the first failure (in completion order) is raised at once."""
        results = self.settle(doing, timeout_s, fail_fast=True)
        return results

    def settle(self, doing: str, timeout_s: Optional[float] = None, fail_fast: bool = False) -> list:
        """Each call's result, or its `ActorFailure` in its place (raised instead when `fail_fast`).
        Calls still running at the deadline become `ActorTimeoutError`s; they are not cancelled. Calls
        still running after `heartbeat_s(timeout_s)` are named in one warning before that."""
        start = time.monotonic()
        deadline = math.inf if timeout_s is None else start + timeout_s
        warn_at = start + heartbeat_s(timeout_s)
        pending, results = {f: i for i, f in enumerate(self.futures)}, [None] * len(self.futures)
        while pending:
            now = time.monotonic()
            if warn_at <= now < deadline:
                names = ", ".join(f"{self.kinds[i]} {self.indices[i]}" for i in sorted(pending.values()))
                until = "" if timeout_s is None else f"; its deadline ({timeout_s:.0f} s) ends them in {deadline - now:.0f} s"
                log.warning("still %s after %.0f s, waiting for: %s%s", doing, now - start, names, until)
                warn_at = math.inf
            wait = max(0.0, min(deadline, warn_at) - now)
            done, _ = ray.wait(list(pending), num_returns=1, timeout=None if wait == math.inf else wait)
            if not done and time.monotonic() >= deadline:
                for f, i in pending.items():
                    results[i] = self._failure(ActorTimeoutError, i, f"did not finish {doing} within {timeout_s:.0f} s")
                break
            for fut in done:
                i = pending.pop(fut)
                results[i] = self._result(fut, i, doing)
                if fail_fast and isinstance(results[i], ActorFailure):
                    raise results[i]
        if fail_fast:
            for r in results:
                if isinstance(r, ActorFailure):
                    raise r
        return results

    def _failure(self, cls, i: int, what: str) -> ActorFailure:
        return cls(f"{self.kinds[i]} {self.indices[i]} {what}", self.kinds[i], self.indices[i])

    def _result(self, fut, i: int, doing: str):
        try:
            return ray.get(fut)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as exc:
            return self._failure(ActorDiedError, i, f"died while {doing}: {exc}")
        except (ray.exceptions.OutOfMemoryError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError) as exc:
            # Ray's memory monitor, a crashed worker process or a lost node: the actor's process is gone
            # all the same, so it is replaced (or the run stops) like any dead actor.
            return self._failure(ActorDiedError, i, f"died while {doing} ({type(exc).__name__}): {exc}")
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return self._failure(ActorCallError, i, f"failed while {doing}: {type(cause).__name__}: {cause}")


HEARTBEAT_S = 300.0  # a call outstanding this long is named in the log, whatever its deadline


def heartbeat_s(timeout_s: Optional[float]) -> float:
    """When calls still outstanding are named in a warning: at HEARTBEAT_S, or halfway to the deadline if
    that comes sooner, so the warning always precedes the deadline."""
    return HEARTBEAT_S if timeout_s is None else min(HEARTBEAT_S, timeout_s / 2)


class ActorGroup:
    """Actors of one kind, named `<kind> <index>` in every error."""

    def __init__(self, kind: str, actors: Sequence):
        self.kind, self.actors = kind, list(actors)

    def __len__(self) -> int:
        return len(self.actors)

    def name(self, index: int) -> str:
        return f"{self.kind} {index}"

    def submit(self, method: str, *args: Any, only: Optional[Sequence[int]] = None, **kwargs: Any) -> Calls:
        """The same call on every actor (or on the indices in `only`), not yet waited for."""
        idx = list(range(len(self.actors)) if only is None else only)
        return Calls([getattr(self.actors[i], method).remote(*args, **kwargs) for i in idx], [self.kind] * len(idx), idx)

    def submit_each(self, method: str, args_per_actor: Sequence[Optional[tuple]]) -> Calls:
        """Actor i gets `args_per_actor[i]`; an entry of None skips that actor."""
        pairs = [(i, a) for i, a in enumerate(args_per_actor) if a is not None]
        return Calls([getattr(self.actors[i], method).remote(*a) for i, a in pairs], [self.kind] * len(pairs),
                     [i for i, _ in pairs])

    def call(self, method: str, *args: Any, doing: str, timeout_s: Optional[float] = None, **kwargs: Any) -> list:
        return self.submit(method, *args, **kwargs).wait(doing, timeout_s)

    def call_each(self, method: str, args_per_actor: Sequence[Optional[tuple]], doing: str,
                  timeout_s: Optional[float] = None) -> list:
        return self.submit_each(method, args_per_actor).wait(doing, timeout_s)

    def call_one(self, index: int, method: str, *args: Any, doing: str, timeout_s: Optional[float] = None) -> Any:
        return self.submit(method, *args, only=[index]).wait(doing, timeout_s)[0]

    def shutdown(self, method: Optional[str] = None, timeout_s: float = 60) -> None:
        """Best effort: call `method` on each live actor (bounded wait), then kill them all. An actor
        that already died must not hide the run's own error, so failures are only logged."""
        if method is not None:
            for failure in self.submit(method).settle(f"calling {method}", timeout_s):
                if isinstance(failure, ActorFailure):
                    log.warning("%s", failure)
        for actor in self.actors:
            ray.kill(actor)
