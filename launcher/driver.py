"""The single controller: draw prompts, generate and score, train, sync weights, log. Owns no model tensor.

Every call to an actor goes through an `ActorGroup` (launcher/actor_group.py), so a dead actor is an
error naming it wherever it happens. A dead or stuck rollout worker is survived: it is replaced in its
placement bundle, the weight-sync group is re-formed, the new worker gets the current weights, and its
work is re-issued. A learner rank cannot be replaced in place (its optimiser state lives only there):
its failure ends the run, which then resumes from a checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import ray

from launcher import cluster, faults, stops
from launcher.actor_group import ActorDiedError, ActorFailure, ActorGroup, ActorTimeoutError, Calls
from launcher.config import Config
from medvqa.record import MedVQARecord
from protocol.batch import RolloutBatch
from protocol.weight_update import WeightUpdateMeta, resolve_backend

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Actors:
    cfg: Config
    model_path: str  # the checkpoint every actor started from (a replaced rollout worker starts from it too)
    learners: ActorGroup
    workers: ActorGroup
    placement: cluster.Placement
    worker_pids: list[list[int]]  # each rollout worker's processes (actor and engine), to kill a stuck one
    learner_port: int  # the learners' own group: a re-formed weight-sync group must not take it
    version: int = 0  # the weight version the rollout workers hold
    learner_ahead: bool = False  # the learner has stepped since that version was pushed (learner.sync_every > 1)
    restarts: int = 0  # rollout workers replaced so far
    update_meta: Optional[dict] = None  # the weight-update description, fetched from rank 0 once
    learner_pids: list = dataclasses.field(default_factory=list)  # each rank's processes, to read or kill a stuck one
    faults_dir: Optional[Path] = None  # where a stuck actor's stacks are written (<run>/faults); None: not written


def make_run_dir(cfg: Config) -> Path:
    if cfg.logging.run_dir:
        run_dir = Path(cfg.logging.run_dir)
    else:
        run_dir = Path("runs") / f"{cfg.logging.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir.resolve()


def prepare_model(cfg: Config) -> str:
    """The policy's starting checkpoint; the tiny model is built on the fly when asked for and absent."""
    path = Path(cfg.model.path)
    if path.exists():
        return str(path)
    if cfg.model.build_tiny_if_missing:
        from medvqa.tiny_model import build_tiny_model

        log.info("building the tiny Qwen2-VL at %s", path)
        return build_tiny_model(str(path), seed=cfg.model.tiny_seed)
    return cfg.model.path  # a hub id, resolved by transformers and vLLM from the node's cache


def format_warmup(cfg: Config, model_path: str, records, run_dir: Path) -> str:
    """Supervised warm-up on the answer format only, in a Ray task so the driver stays tensor-free."""
    from learner.format_warmup import warmup_format

    out = run_dir / "warmup"
    task = ray.remote(num_cpus=cfg.cluster.cpus_per_actor, num_gpus=cluster.actor_gpus(cfg, "learner"))(
        warmup_format)
    log.info("format warm-up: %d steps at lr %g", cfg.train.format_warmup_steps, cfg.train.format_warmup_lr)
    return ray.get(task.remote(model_path, str(out), records, cfg.train.format_warmup_steps,
                               cfg.train.format_warmup_lr, cfg.train.seed, cfg.model.min_pixels,
                               cfg.model.max_pixels))


# Joining takes seconds once every actor has started; below vLLM's 300 s NCCL rendezvous timeout, so
# that a rank that never joins is named here before the learner's TCPStore gives up with a bare count.
JOIN_TIMEOUT_S = 240.0


def start_actors(cfg: Config, model_path: str) -> Actors:
    placement = cluster.place(cfg)
    # Both groups' rank 0 live on the learner's first bundle; one call gives two distinct ports.
    addr, drawn = cluster.rendezvous(placement, placement.learner_bundles[0], 2)
    learner_port, sync_port = cluster.group_ports(cfg, drawn)
    if cfg.cluster.colocate:
        learners, workers = cluster.start_colocated(cfg, placement, model_path, addr, learner_port)
    else:
        learners = cluster.start_learners(cfg, placement, model_path, addr, learner_port)
        workers = cluster.start_workers(cfg, placement, model_path)
        # Nobody joins the sync group while an engine may still be compiling (CUDA graphs of several
        # engines can outlast vLLM's 300 s rendezvous): every actor has started before anyone joins.
        cluster.wait_started([learners])
    pids = workers.call("process_ids", doing="starting")
    actors = Actors(cfg, model_path, learners, workers, placement, pids, learner_port,
                    learner_pids=learners.call("process_ids", doing="starting"))
    join_weight_sync(actors, addr, sync_port)
    return actors


def join_weight_sync(actors: Actors, addr: Optional[str] = None, port: Optional[int] = None) -> None:
    """(Re-)form the weight-sync group: learner rank 0 (every rank, for ipc) and every process of every
    rollout engine."""
    cfg = actors.cfg
    if port is None:
        addr, ports = cluster.rendezvous(actors.placement, actors.placement.learner_bundles[0], 2)
        port = next(p for p in ports if p != actors.learner_port)
    tp = cfg.rollout.tensor_parallel_size
    world = 1 + len(actors.workers) * tp
    backend = resolve_backend(cfg.cluster.sync_backend, cfg.cluster.device, cfg.cluster.colocate)
    joins = actors.learners.submit("init_weight_sync", addr, port, world, backend,
                                   only=None if backend == "ipc" else [0])
    joins += actors.workers.submit_each("init_weight_sync",
                                        [(addr, port, 1 + i * tp, world, backend) for i in range(len(actors.workers))])
    wait_naming_the_late(joins, f"joining the {backend} weight-sync group at {addr}:{port}",
                         min(JOIN_TIMEOUT_S, rollout_timeout(cfg, 0)))


def wait_naming_the_late(calls: Calls, doing: str, timeout_s: float) -> list:
    """`calls.wait`, except that a timeout names every actor that had not finished, not only the first."""
    try:
        return calls.wait(doing, timeout_s)
    except ActorTimeoutError as exc:
        late = [r for r in calls.settle(doing, 0) if isinstance(r, ActorTimeoutError)] or [exc]
        names = ", ".join(f"{r.kind} {r.index}" for r in late)
        raise ActorTimeoutError(f"{names} did not finish {doing} within {timeout_s:.0f} s", late[0].kind,
                                late[0].index) from exc


def rollout_timeout(cfg: Config, num_prompts: int) -> float:
    """The deadline of one call to the rollout workers: rollout.timeout_s, else derived from the work
    (generous: a stuck engine is caught, a slow one is not)."""
    if cfg.rollout.timeout_s > 0:
        return float(cfg.rollout.timeout_s)
    r = cfg.rollout
    return 300.0 + 0.1 * num_prompts * r.group_size * r.max_new_tokens / r.num_workers


def learner_timeout(cfg: Config, samples_per_rank: int = 0) -> float:
    """The deadline of one call to the learner ranks (train, weight push, save, load): learner.timeout_s,
    else derived from the work (generous: a stuck rank is caught, a slow one is not)."""
    if cfg.learner.timeout_s > 0:
        return float(cfg.learner.timeout_s)
    return 1800.0 + 0.05 * samples_per_rank * cfg.rollout.max_new_tokens * cfg.learner.mu


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous shards whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


@dataclasses.dataclass
class PendingRollout:
    """Generation calls already sent to the rollout workers, not yet waited for."""
    records: list[MedVQARecord]
    seed: int
    calls: Calls
    sent_to: list  # the worker actor at each index when the calls were sent


def _generate_args(actors: Actors, records: list[MedVQARecord], seed: int) -> list[Optional[tuple]]:
    """Worker i samples shard i (contiguous, sizes within one) with seed + i."""
    return [(s, seed + i) if s else None for i, s in enumerate(split_evenly(records, len(actors.workers)))]


def submit_generate(actors: Actors, records: list[MedVQARecord], seed: int) -> PendingRollout:
    """Send the generation of `records` to the workers without waiting: each samples with the weights it
    holds when it gets to the call (calls run in the order they were sent, a weight update included)."""
    calls = actors.workers.submit_each("generate", _generate_args(actors, records, seed))
    return PendingRollout(list(records), seed, calls, list(actors.workers.actors))


def generate(actors: Actors, records: list[MedVQARecord], seed: int) -> RolloutBatch:
    """G scored samples per record, sampled now (see `collect`)."""
    return collect(actors, submit_generate(actors, records, seed))


def collect(actors: Actors, pending: PendingRollout) -> RolloutBatch:
    """The batch of submitted generation calls; the shards are joined in the records' order. A worker
    that dies or misses its deadline is replaced and its shard sampled again (same seed). If that leaves
    shards of different weight versions (the replacement holds newer weights than the others had when
    they sampled ahead), the whole batch is sampled again, now."""
    args = _generate_args(actors, pending.records, pending.seed)
    timeout = rollout_timeout(actors.cfg, max(len(a[0]) for a in args if a))
    parts = settle_with_recovery(actors, "generate", args, "generating", timeout, first=pending)
    if len({p.weight_version for p in parts.values()}) > 1:
        parts = settle_with_recovery(actors, "generate", args, "generating", timeout)
    batch = RolloutBatch.concat([parts[i] for i in sorted(parts)])
    batch.check_records(pending.records)
    return batch


def greedy_with_recovery(actors: Actors, args: list, doing: str) -> list:
    """`generate_greedy` on the workers given args (an evaluation's shards); a worker that dies or
    misses its deadline is replaced (with the current weights) and its shard run again, so the results
    equal an undisturbed evaluation's."""
    prompts, version = max(len(a[0]) for a in args if a), actors.version
    parts = settle_with_recovery(actors, "generate_greedy", args, doing, rollout_timeout(actors.cfg, prompts))
    if actors.version != version:  # a replacement brought newer weights to every worker: evaluate them all
        parts = settle_with_recovery(actors, "generate_greedy", args, doing, rollout_timeout(actors.cfg, prompts))
    return [parts[i] for i in sorted(parts)]


def shard_for_rank(batch: RolloutBatch, records: list[MedVQARecord], rank: int,
                   world: int) -> tuple[RolloutBatch, list[MedVQARecord]]:
    """Whole groups per rank (prompts rank::world) so each rank computes its own group advantages."""
    prompts = list(range(rank, batch.num_prompts, world))
    return batch.select_prompts(prompts), [records[p] for p in prompts]


def train(actors: Actors, batch: RolloutBatch, records: list[MedVQARecord]) -> dict:
    if actors.cfg.cluster.colocate:
        free_gpus_for_training(actors)
    world = len(actors.learners)
    calls = actors.learners.submit_each("train_on", [shard_for_rank(batch, records, r, world) for r in range(world)])
    actors.learner_ahead = True
    stats = wait_naming_the_late(calls, "training", learner_timeout(actors.cfg, -(-batch.num_samples // world)))
    # Ranks report their own shard's numbers; the step's value is their mean.
    return {k: sum(s[k] for s in stats) / world for k in stats[0]}


def free_gpus_for_training(actors: Actors) -> None:
    """Colocated: each engine sleeps (weights to host memory, KV cache freed) so that its learner rank
    has the GPU; it wakes for the next weight update or generation."""
    actors.workers.call("sleep", doing="putting the engines to sleep for training",
                        timeout_s=rollout_timeout(actors.cfg, 0))


def sync_weights(actors: Actors, version: int, queued_prompts: int = 0) -> int:
    """Push the learner's weights as `version` into every engine; a rollout worker that fails the
    update is replaced, and the update is sent again. Each worker takes the update after the calls
    already queued on it (`queued_prompts` prompts of generation sent ahead, which the deadline covers).
    Returns the bytes of one update (only the parameters that train are sent)."""
    if actors.update_meta is None:  # fixed for a model: asked for once per run
        actors.update_meta = actors.learners.call_one(0, "weight_update_meta", doing="describing the weights",
                                                      timeout_s=learner_timeout(actors.cfg))
    timeout = rollout_timeout(actors.cfg, 0) + (rollout_timeout(actors.cfg, queued_prompts) if queued_prompts else 0)
    sync_with_recovery(actors, version, timeout)
    return WeightUpdateMeta.from_dict(actors.update_meta).total_bytes


def save_policy(actors: Actors, out_dir: Path) -> None:
    """Every rank takes part (ZeRO-3 gathers the parameters); rank 0 writes the HF checkpoint."""
    _on_every_rank(actors, "save", str(out_dir), doing=f"saving {out_dir}")


def rollout_metrics(batch: RolloutBatch) -> dict:
    n = batch.num_samples
    lengths = [len(c) for c in batch.completion_token_ids]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = {f"reward/{k}": mean(v) for k, v in batch.rewards.items()}
    out["reward/total"] = mean(batch.total_rewards)
    out["response_length/mean"] = mean(lengths)
    out["response_length/max"] = max(lengths)
    out["response_length/truncated_fraction"] = sum(f == "length" for f in batch.finish_reasons) / n
    return out


def sample_rows(batch: RolloutBatch, records: list[MedVQARecord], count: int) -> list[dict]:
    from medvqa.prompt import question_text

    rows = []
    for i in range(min(count, batch.num_samples)):
        rec = records[i // batch.group_size]
        rows.append({"image": rec.load_image(), "prompt": question_text(rec), "completion": batch.completion_texts[i],
                     "reward/total": batch.total_rewards[i], "answer": rec.answer, "modality": rec.modality,
                     "record_id": rec.id, **{f"reward/{k}": v[i] for k, v in batch.rewards.items()}})
    return rows


def stop_actors(actors: Actors) -> None:
    """Stop the workers (letting their engines exit), the learner ranks, then free their placement. Each
    phase first checks that the Ray cluster is still there: after a scancel or a time limit the Ray nodes
    stop with the driver, and a Ray call to a dead GCS would wait past Slurm's KillWait."""
    phases = [("rollout workers", lambda: actors.workers.shutdown("shutdown", timeout_s=10 if stops.requested() else 60)),
              ("learner ranks", actors.learners.shutdown),
              ("placement group", actors.placement.remove)]
    for what, stop in phases:
        if not cluster.gcs_reachable():
            log.warning("the Ray cluster is gone (its GCS does not answer): not stopping the %s", what)
            return
        stop()


def load_learner_state(actors: Actors, checkpoint_learner_dir: Path) -> None:
    _on_every_rank(actors, "load_state", str(checkpoint_learner_dir), doing=f"loading {checkpoint_learner_dir}")


def save_learner_state(actors: Actors, out_dir: Path) -> None:
    _on_every_rank(actors, "save_state", str(out_dir), doing=f"saving the training state to {out_dir}")


def _on_every_rank(actors: Actors, method: str, *args, doing: str) -> list:
    """`method` on every learner rank within the learner deadline; a late one is named."""
    return wait_naming_the_late(actors.learners.submit(method, *args), doing, learner_timeout(actors.cfg))


# ---- surviving a dead or stuck rollout worker ----------------------------------------------------


class WorkerRestartsExhausted(RuntimeError):
    """More rollout workers failed than cluster.max_worker_restarts allows."""


def _failed_workers(results: dict) -> dict[int, ActorFailure]:
    return {i: r for i, r in results.items() if isinstance(r, ActorFailure)}


def settle_with_recovery(actors: Actors, method: str, args: Sequence[Optional[tuple]], doing: str,
                         timeout_s: float, first: Optional[PendingRollout] = None) -> dict:
    """{worker index: result} of `method` on the workers with args (the calls of `first` when they were
    sent already); failed workers are replaced and their calls re-issued until every call succeeded (or
    the restart budget is spent)."""
    results = {}
    calls, sent_to = (first.calls, first.sent_to) if first else (None, None)
    while True:
        if calls is None:
            todo = [a if i not in results else None for i, a in enumerate(args)]
            calls, sent_to = actors.workers.submit_each(method, todo), list(actors.workers.actors)
        results.update(zip(calls.indices, calls.settle(doing, timeout_s)))
        failed = _failed_workers(results)
        if not failed:
            return results
        # A worker replaced since the call was sent (in a weight sync) is new and healthy: only re-issue.
        replace_workers(actors, {i: f for i, f in failed.items() if actors.workers.actors[i] is sent_to[i]})
        for i in failed:
            del results[i]
        calls = None


def sync_with_recovery(actors: Actors, version: int, timeout: float) -> None:
    """Send update `version` to every engine. A receiver that fails it (a rollout worker dead, stuck or
    raising) is replaced, and the update is sent to all again (the re-formed group needs every member in
    the broadcast). A failure of the sender stops the run naming the learner rank: its own error, its
    death, or a push still stuck after the receivers it waited on were replaced."""
    sender_was_late = False
    while True:
        calls = actors.learners.submit("push_weights", version)
        calls += actors.workers.submit("receive_weights", version, actors.update_meta)
        failures = [r for r in calls.settle(f"syncing weights (version {version})", timeout)
                    if isinstance(r, ActorFailure)]
        if not failures:
            actors.version, actors.learner_ahead = version, False
            return
        receivers = {r.index: r for r in failures if r.kind == actors.workers.kind}
        senders = [r for r in failures if r.kind == actors.learners.kind]
        if any(isinstance(r, ActorDiedError) for r in senders):
            raise senders[0]
        if senders and all(isinstance(r, ActorTimeoutError) for r in receivers.values()):
            # No receiver died or raised (a dead engine, a closed connection), which would explain the
            # sender's error: it is the sender's own. When both sides ran out of time, either may hold the
            # other up: the receivers are replaced once, and a sender late again with fresh ones is stuck.
            stuck_together = receivers and all(isinstance(r, ActorTimeoutError) for r in senders)
            if not stuck_together or sender_was_late:
                raise senders[0]
            sender_was_late = True
        replace_workers(actors, receivers, push_weights=False)


def replace_workers(actors: Actors, failed: dict[int, ActorFailure], push_weights: bool = True) -> None:
    """Kill each failed worker's process tree, start a new one in the same bundle, re-form the group,
    then (unless the caller sends the update itself) push the current weights to every worker."""
    cfg = actors.cfg
    if not failed:
        return
    if stops.requested():
        # Stopping anyway; and a scancel or time limit signals every Slurm step, the Ray nodes' too, so
        # a replacement would only die with them. The command reports the stop, this failure its echo.
        raise min(failed.items())[1]
    for index, failure in sorted(failed.items()):
        actors.restarts += 1
        if actors.restarts > cfg.cluster.max_worker_restarts:
            raise WorkerRestartsExhausted(
                f"rollout worker {index} failed and cluster.max_worker_restarts={cfg.cluster.max_worker_restarts} "
                f"replacements are used up; its last error: {failure}")
        log.warning("replacing rollout worker %d (%d of at most %d): %s", index, actors.restarts,
                    cfg.cluster.max_worker_restarts, failure)
        bundle = actors.placement.worker_bundles[index]
        if isinstance(failure, ActorTimeoutError):
            write_stacks(actors, actors.workers, index, actors.worker_pids[index], bundle, str(failure))
        _kill_worker(actors, index)
        actors.workers.actors[index] = cluster.start_worker(cfg, actors.placement, actors.model_path, index, bundle)
        actors.worker_pids[index] = actors.workers.call_one(index, "process_ids", doing="starting")
    join_weight_sync(actors)
    if push_weights:
        # Every worker gets the learner's weights as they are now. If the learner has stepped since the last
        # push (learner.sync_every > 1), they are a new version: labelled as the old one they would make
        # batches look older than they are, and shards of two weight sets pass for one.
        version = actors.version + 1 if actors.learner_ahead else actors.version
        if version != actors.version:
            log.warning("the learner has stepped since version %d was pushed: every rollout worker gets its current "
                        "weights as version %d", actors.version, version)
        sync_weights(actors, version)


def write_stacks(actors: Actors, group: ActorGroup, index: int, pids: list[int], bundle: int, doing: str) -> None:
    """A stuck actor's Python stacks into <run>/faults/ (when the run has one), named in the log."""
    if actors.faults_dir is None:
        return
    path = faults.write_stacks(group.name(index), pids, actors.placement.strategy(bundle), actors.faults_dir, doing)
    if path is not None:
        log.warning("%s: the stack of each of its threads is in %s", group.name(index), path)


def stop_stuck_learners(actors: Actors, failure: ActorFailure) -> None:
    """After a learner rank failed: the stacks of every rank when it was a deadline (the late rank and
    the peers it holds in a collective), then SIGKILL of every rank's processes. A rank stopped or blocked
    in C would not act on Ray's request to exit."""
    for rank, bundle in enumerate(actors.placement.learner_bundles):
        if isinstance(failure, ActorTimeoutError) and rank < len(actors.learner_pids):
            write_stacks(actors, actors.learners, rank, actors.learner_pids[rank], bundle, str(failure))
    for rank, bundle in enumerate(actors.placement.learner_bundles):
        if rank < len(actors.learner_pids):
            _kill_processes(actors, bundle, actors.learner_pids[rank], actors.learners.name(rank))


def _kill_worker(actors: Actors, index: int) -> None:
    """SIGKILL the worker's processes and anything below them on its node (a stopped engine process
    ignores anything else, and would otherwise outlive its actor), then let Ray forget the actor."""
    _kill_processes(actors, actors.placement.worker_bundles[index], actors.worker_pids[index],
                    actors.workers.name(index))
    ray.kill(actors.workers.actors[index])


def _kill_processes(actors: Actors, bundle: int, pids: list[int], name: str) -> None:
    """SIGKILL `pids` and everything below them, on the node of `bundle`; a warning if that fails (the
    node itself may be gone)."""
    try:
        ray.get(cluster.kill_process_tree.options(scheduling_strategy=actors.placement.strategy(bundle))
                .remote(pids), timeout=60)
    except Exception as exc:
        log.warning("%s: could not kill its processes: %s", name, exc)
