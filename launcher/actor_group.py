"""One handle for fanning out to a set of Ray actors of one kind (learner ranks, rollout workers).

Every remote call of the driver goes through here, so every failure looks the same: a dead actor
becomes an `ActorDiedError` naming the actor and what the step was doing, as soon as it dies (its
peers may still be blocked in a collective waiting for it).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import ray

log = logging.getLogger(__name__)


class ActorDiedError(RuntimeError):
    """An actor of the run died mid-step; the message names which one and what the step was doing."""


@dataclasses.dataclass
class Calls:
    """Submitted remote calls and the name of the actor behind each."""

    futures: list
    names: list[str]

    def __add__(self, other: "Calls") -> "Calls":
        return Calls(self.futures + other.futures, self.names + other.names)

    def wait(self, doing: str) -> list:
        return gather(self.futures, self.names, doing)


def gather(futures: list, names: list[str], doing: str) -> list:
    """ray.get in completion order, results in submission order; a dead actor is named at once."""
    pending, results = dict(zip(futures, names)), {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for fut in done:
            name = pending.pop(fut)
            try:
                results[fut] = ray.get(fut)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as exc:
                raise ActorDiedError(f"{name} died while {doing}: {exc}") from exc
    return [results[f] for f in futures]


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
        idx = range(len(self.actors)) if only is None else only
        return Calls([getattr(self.actors[i], method).remote(*args, **kwargs) for i in idx],
                     [self.name(i) for i in idx])

    def submit_each(self, method: str, args_per_actor: Sequence[Optional[tuple]]) -> Calls:
        """Actor i gets `args_per_actor[i]`; an entry of None skips that actor."""
        pairs = [(i, a) for i, a in enumerate(args_per_actor) if a is not None]
        return Calls([getattr(self.actors[i], method).remote(*a) for i, a in pairs], [self.name(i) for i, _ in pairs])

    def call(self, method: str, *args: Any, doing: str, **kwargs: Any) -> list:
        return self.submit(method, *args, **kwargs).wait(doing)

    def call_each(self, method: str, args_per_actor: Sequence[Optional[tuple]], doing: str) -> list:
        return self.submit_each(method, args_per_actor).wait(doing)

    def call_one(self, index: int, method: str, *args: Any, doing: str) -> Any:
        return self.submit(method, *args, only=[index]).wait(doing)[0]

    def shutdown(self, method: Optional[str] = None, timeout_s: float = 60) -> None:
        """Best effort: call `method` on each live actor (bounded wait), then kill them all. An actor
        that already died must not hide the run's own error, so failures are only logged."""
        if method is not None:
            calls = self.submit(method)
            for fut, name in zip(calls.futures, calls.names):
                try:
                    ray.get(fut, timeout=timeout_s)
                except Exception as exc:
                    log.warning("%s: %s failed: %s", name, method, exc)
        for actor in self.actors:
            ray.kill(actor)
