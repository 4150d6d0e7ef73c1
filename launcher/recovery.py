"""Surviving a dead or stuck rollout worker: replace it in its placement bundle, re-form the weight-sync
group, give it the current weights, and re-issue its work. A learner rank cannot be replaced in place
(its optimiser state lives only there): its failure ends the run, and the run resumes from a checkpoint.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional, Sequence

import ray

from launcher import cluster
from launcher.actor_group import ActorFailure

if TYPE_CHECKING:
    from launcher.driver import Actors

log = logging.getLogger(__name__)


class WorkerRestartsExhausted(RuntimeError):
    """More rollout workers failed than cluster.max_worker_restarts allows."""


def _failed_workers(results: dict) -> dict[int, ActorFailure]:
    return {i: r for i, r in results.items() if isinstance(r, ActorFailure)}


def settle_with_recovery(actors: "Actors", method: str, args: Sequence[Optional[tuple]], doing: str,
                         timeout_s: float) -> dict:
    """{worker index: result} of `method` on the workers with args; failed workers are replaced and
    their calls re-issued until every call succeeded (or the restart budget is spent)."""
    todo, results = list(args), {}
    while True:
        calls = actors.workers.submit_each(method, todo)
        results.update(zip(calls.indices, calls.settle(doing, timeout_s)))
        failed = _failed_workers(results)
        if not failed:
            return results
        replace_workers(actors, failed)
        todo = [args[i] if i in failed else None for i in range(len(args))]


def sync_with_recovery(actors: "Actors", version: int) -> None:
    """Send update `version` to every engine. Workers that fail it are replaced, and the update is sent
    to all again (the re-formed group needs every member in the broadcast)."""
    from launcher.driver import rollout_timeout

    timeout = rollout_timeout(actors.cfg, 0)
    while True:
        calls = actors.learners.submit("push_weights", version)
        calls += actors.workers.submit("receive_weights", version, actors.update_meta)
        failures = [r for r in calls.settle(f"syncing weights (version {version})", timeout)
                    if isinstance(r, ActorFailure)]
        if not failures:
            actors.version = version
            return
        workers = {r.index: r for r in failures if r.kind == actors.workers.kind}
        if not workers:  # only the learner side failed: nothing to replace
            raise failures[0]
        replace_workers(actors, workers, push_weights=False)


def replace_workers(actors: "Actors", failed: dict[int, ActorFailure], push_weights: bool = True) -> None:
    """Kill each failed worker's process tree, start a new one in the same bundle, re-form the group,
    then (unless the caller sends the update itself) push the current weights to every worker."""
    from launcher.driver import join_weight_sync, sync_weights

    cfg = actors.cfg
    for index, failure in sorted(failed.items()):
        actors.restarts += 1
        if actors.restarts > cfg.cluster.max_worker_restarts:
            raise WorkerRestartsExhausted(
                f"rollout worker {index} failed and cluster.max_worker_restarts={cfg.cluster.max_worker_restarts} "
                f"replacements are used up; its last error: {failure}")
        log.warning("replacing rollout worker %d (%d of at most %d): %s", index, actors.restarts,
                    cfg.cluster.max_worker_restarts, failure)
        _kill_worker(actors, index)
        bundle = actors.placement.worker_bundles[index]
        actors.workers.actors[index] = cluster.start_worker(cfg, actors.placement, actors.model_path, index, bundle)
        actors.worker_pids[index] = actors.workers.call_one(index, "process_id", doing="starting")
    join_weight_sync(actors)
    if push_weights:
        sync_weights(actors, actors.version)


def _kill_worker(actors: "Actors", index: int) -> None:
    """SIGKILL the worker's whole process tree on its node (a stopped engine process ignores anything
    else, and would otherwise outlive its actor), then let Ray forget the actor."""
    bundle = actors.placement.worker_bundles[index]
    try:
        ray.get(cluster.kill_process_tree.options(scheduling_strategy=actors.placement.strategy(bundle))
                .remote(actors.worker_pids[index]), timeout=60)
    except Exception as exc:  # the node itself may be gone; Ray's kill below still applies
        log.warning("rollout worker %d: could not kill its processes: %s", index, exc)
    ray.kill(actors.workers.actors[index])
