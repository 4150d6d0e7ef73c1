"""The single controller: every call from the run to its actors, behind one object. Owns no model tensor.

`Controller.start` places and starts the learner ranks and rollout workers and forms the weight-sync
group. Its methods are what a step does with them: `submit_generate`/`collect`/`generate` (sampling
and scoring), `train`/`train_sft`, `sync` (the weight push), `evaluate`, `save` (the Hugging Face
policy), `save_state`/`restore` (the resumable learner state), `replace_workers`, `stop`.

Every call to an actor goes through an `ActorGroup` (launcher/actor_group.py), so a dead actor is an
error naming it wherever it happens. A dead or stuck rollout worker is survived here: it is replaced in
its placement bundle, the weight-sync group is re-formed, the new worker gets the current weights, and
its work is re-issued. A learner rank cannot be replaced in place (its optimiser state lives only
there): its failure ends the run (`stop_stuck_learners`), which then resumes from a checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence

import ray

from launcher import cluster, faults, stops
from launcher.actor_group import ActorDiedError, ActorFailure, ActorGroup, ActorTimeoutError, Calls
from launcher.config import Config
from launcher.evaluate import evaluate_sets, split_evenly
from launcher.stops import StopSignals
from medvqa.record import MedVQARecord
from protocol.batch import RolloutBatch
from protocol.weight_update import WeightUpdateMeta, resolve_backend

log = logging.getLogger(__name__)

# Joining takes seconds once every actor has started; below vLLM's 300 s NCCL rendezvous timeout, so
# that a rank that never joins is named here before the learner's TCPStore gives up with a bare count.
JOIN_TIMEOUT_S = 240.0


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


def both_sides_timeout(cfg: Config) -> float:
    """The deadline of a call that holds a learner rank and the rollout workers together (the weight push,
    joining the sync group): each waits for the other, so the smaller of the two sides' deadlines (a
    configured learner.timeout_s bounds every call to a rank, the push included)."""
    base = rollout_timeout(cfg, 0)
    return min(base, learner_timeout(cfg)) if cfg.learner.timeout_s > 0 else base


def wait_naming_the_late(calls: Calls, doing: str, timeout_s: float) -> list:
    """`calls.wait`, except that a timeout names every actor that had not finished, not only the first."""
    try:
        return calls.wait(doing, timeout_s)
    except ActorTimeoutError as exc:
        late = [r for r in calls.settle(doing, 0) if isinstance(r, ActorTimeoutError)] or [exc]
        names = ", ".join(f"{r.kind} {r.index}" for r in late)
        raise ActorTimeoutError(f"{names} did not finish {doing} within {timeout_s:.0f} s", late[0].kind,
                                late[0].index) from exc


def shard_for_rank(batch: RolloutBatch, records: list[MedVQARecord], rank: int,
                   world: int) -> tuple[RolloutBatch, list[MedVQARecord]]:
    """Whole groups per rank (prompts rank::world) so each rank computes its own group advantages."""
    prompts = list(range(rank, batch.num_prompts, world))
    return batch.select_prompts(prompts), [records[p] for p in prompts]


class WorkerRestartsExhausted(RuntimeError):
    """More rollout workers failed than cluster.max_worker_restarts allows."""


@dataclasses.dataclass
class PendingRollout:
    """Generation calls already sent to the rollout workers, not yet waited for."""
    records: list[MedVQARecord]
    seed: int
    calls: Calls
    sent_to: list  # the worker actor at each index when the calls were sent


@dataclasses.dataclass
class Controller:
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
    signals: StopSignals = stops.SIGNALS  # the run's stop requests: a stopping run replaces no worker

    @classmethod
    def start(cls, cfg: Config, model_path: str, faults_dir: Optional[Path] = None,
              signals: StopSignals = stops.SIGNALS) -> "Controller":
        """Every actor of the run started from `model_path`, and the weight-sync group formed."""
        placement = cluster.place(cfg)
        # Both groups' rank 0 live on the learner's first bundle. The weight-sync port is drawn when the group is
        # formed, after every actor started: a port drawn now could be taken by then.
        addr, drawn = cluster.rendezvous(placement, placement.learner_bundles[0], 2)
        learner_port, _ = cluster.group_ports(cfg, drawn)
        if cfg.cluster.colocate:
            learners, workers = cluster.start_colocated(cfg, placement, model_path, addr, learner_port)
        else:
            learners = cluster.start_learners(cfg, placement, model_path, addr, learner_port)
            workers = cluster.start_workers(cfg, placement, model_path)
            # Nobody joins the sync group while an engine may still be compiling (CUDA graphs of several
            # engines can outlast vLLM's 300 s rendezvous): every actor has started before anyone joins.
            cluster.wait_started([learners])
        pids = workers.call("process_ids", doing="starting")
        ctl = cls(cfg, model_path, learners, workers, placement, pids, learner_port,
                  learner_pids=learners.call("process_ids", doing="starting"), faults_dir=faults_dir, signals=signals)
        ctl._join_weight_sync()
        return ctl

    # ---- generation -------------------------------------------------------------------------------

    def submit_generate(self, records: list[MedVQARecord], seed: int) -> PendingRollout:
        """Send the generation of `records` to the workers without waiting: each samples with the weights it
        holds when it gets to the call (calls run in the order they were sent, a weight update included)."""
        calls = self.workers.submit_each("generate", self._generate_args(records, seed))
        return PendingRollout(list(records), seed, calls, list(self.workers.actors))

    def collect(self, pending: PendingRollout) -> RolloutBatch:
        """The batch of submitted generation calls; the shards are joined in the records' order. A worker
        that dies or misses its deadline is replaced and its shard sampled again (same seed). If that leaves
        shards of different weight versions (the replacement holds newer weights than the others had when
        they sampled ahead), the whole batch is sampled again, now."""
        args = self._generate_args(pending.records, pending.seed)
        timeout = rollout_timeout(self.cfg, max(len(a[0]) for a in args if a))
        parts = self._settle("generate", args, "generating", timeout, first=pending)
        if len({p.weight_version for p in parts.values()}) > 1:
            parts = self._settle("generate", args, "generating", timeout)
        batch = RolloutBatch.concat([parts[i] for i in sorted(parts)])
        batch.check_records(pending.records)
        return batch

    def generate(self, records: list[MedVQARecord], seed: int) -> RolloutBatch:
        """G scored samples per record, sampled now (see `collect`)."""
        return self.collect(self.submit_generate(records, seed))

    def _generate_args(self, records: list[MedVQARecord], seed: int) -> list[Optional[tuple]]:
        """Worker i samples shard i (contiguous, sizes within one) with seed + i."""
        return [(s, seed + i) if s else None for i, s in enumerate(split_evenly(records, len(self.workers)))]

    def evaluate(self, eval_sets: dict, max_new_tokens: int) -> tuple[dict, list[dict]]:
        """Greedy answers to every evaluation set by the rollout workers, with the weights they hold
        (launcher/evaluate.py:evaluate_sets); a worker that fails is replaced and its shard run again."""
        return evaluate_sets(self.workers, eval_sets, max_new_tokens, run=self._greedy_with_recovery)

    def _greedy_with_recovery(self, args: list, doing: str) -> list:
        """`generate_greedy` on the workers given args (an evaluation's shards); a worker that dies or
        misses its deadline is replaced (with the current weights) and its shard run again, so the results
        equal an undisturbed evaluation's."""
        prompts, version = max(len(a[0]) for a in args if a), self.version
        parts = self._settle("generate_greedy", args, doing, rollout_timeout(self.cfg, prompts))
        if self.version != version:  # a replacement brought newer weights to every worker: evaluate them all
            parts = self._settle("generate_greedy", args, doing, rollout_timeout(self.cfg, prompts))
        return [parts[i] for i in sorted(parts)]

    # ---- training and weights ------------------------------------------------------------------------

    def train(self, batch: RolloutBatch, records: list[MedVQARecord]) -> dict:
        """One GRPO step on every learner rank (whole groups per rank); the step's statistics."""
        if self.cfg.cluster.colocate:
            self._free_gpus_for_training()
        world = len(self.learners)
        calls = self.learners.submit_each("train_on", [shard_for_rank(batch, records, r, world) for r in range(world)])
        self.learner_ahead = True
        stats = wait_naming_the_late(calls, "training", learner_timeout(self.cfg, -(-batch.num_samples // world)))
        # Ranks report their own shard's numbers; the step's value is their mean.
        return {k: sum(s[k] for s in stats) / world for k in stats[0]}

    def train_sft(self, records: list[MedVQARecord], target: str) -> list[dict]:
        """One supervised step on every learner rank (records rank::world); each rank's statistics."""
        world = len(self.learners)
        calls = self.learners.submit_each("train_sft", [(records[r::world], target) for r in range(world)])
        self.learner_ahead = True
        return wait_naming_the_late(calls, "training (sft)", learner_timeout(self.cfg, -(-len(records) // world)))

    def _free_gpus_for_training(self) -> None:
        """Colocated: each engine sleeps (weights to host memory, KV cache freed) so that its learner rank
        has the GPU; it wakes for the next weight update or generation."""
        self.workers.call("sleep", doing="putting the engines to sleep for training",
                          timeout_s=rollout_timeout(self.cfg, 0))

    def sync(self, version: int, queued_prompts: int = 0) -> int:
        """Push the learner's weights as `version` into every engine; a rollout worker that fails the
        update is replaced, and the update is sent again. Each worker takes the update after the calls
        already queued on it (`queued_prompts` prompts of generation sent ahead, which the deadline covers).
        Returns the bytes of one update (only the parameters that train are sent)."""
        if self.update_meta is None:  # fixed for a model: asked for once per run
            self.update_meta = self.learners.call_one(0, "weight_update_meta", doing="describing the weights",
                                                      timeout_s=learner_timeout(self.cfg))
        queued = rollout_timeout(self.cfg, queued_prompts) if queued_prompts else 0
        timeout = both_sides_timeout(self.cfg) + queued
        self._sync_with_recovery(version, timeout)
        return WeightUpdateMeta.from_dict(self.update_meta).total_bytes

    def _join_weight_sync(self) -> None:
        """(Re-)form the weight-sync group on a port drawn now: learner rank 0 (every rank, for ipc) and every
        process of every rollout engine."""
        cfg = self.cfg
        addr, ports = cluster.rendezvous(self.placement, self.placement.learner_bundles[0], 2)
        port = next(p for p in ports if p != self.learner_port)
        tp = cfg.rollout.tensor_parallel_size
        world = 1 + len(self.workers) * tp
        backend = resolve_backend(cfg.cluster.sync_backend, cfg.cluster.device, cfg.cluster.colocate)
        joins = self.learners.submit("init_weight_sync", addr, port, world, backend,
                                     only=None if backend == "ipc" else [0])
        joins += self.workers.submit_each("init_weight_sync",
                                          [(addr, port, 1 + i * tp, world, backend) for i in range(len(self.workers))])
        wait_naming_the_late(joins, f"joining the {backend} weight-sync group at {addr}:{port}",
                             min(JOIN_TIMEOUT_S, both_sides_timeout(cfg)))

    # ---- saved state ---------------------------------------------------------------------------------

    def save(self, out_dir: Path) -> None:
        """The policy as a Hugging Face checkpoint: every rank takes part (ZeRO-3 gathers the parameters);
        rank 0 writes it."""
        self._on_every_rank("save", str(out_dir), doing=f"saving {out_dir}")

    def save_state(self, out_dir: Path) -> None:
        """Every rank's resumable state (DeepSpeed's engine, optimiser, scheduler, random generators)."""
        self._on_every_rank("save_state", str(out_dir), doing=f"saving the training state to {out_dir}")

    def restore(self, learner_dir: Path) -> None:
        """Every rank's state from a checkpoint's learner folder (the weights reach the workers by `sync`)."""
        self._on_every_rank("load_state", str(learner_dir), doing=f"loading {learner_dir}")

    def _on_every_rank(self, method: str, *args, doing: str) -> list:
        """`method` on every learner rank within the learner deadline; a late one is named."""
        return wait_naming_the_late(self.learners.submit(method, *args), doing, learner_timeout(self.cfg))

    # ---- stopping ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the workers (letting their engines exit), the learner ranks, then free their placement. Each
        phase first checks that the Ray cluster is still there: after a scancel or a time limit the Ray nodes
        stop with the driver, and a Ray call to a dead GCS would wait past Slurm's KillWait."""
        phases = [("rollout workers", lambda: self.workers.shutdown("shutdown", timeout_s=10 if self.signals.requested() else 60)),
                  ("learner ranks", self.learners.shutdown),
                  ("placement group", self.placement.remove)]
        for what, stop in phases:
            if not cluster.gcs_reachable():
                log.warning("the Ray cluster is gone (its GCS does not answer): not stopping the %s", what)
                return
            stop()

    def stop_stuck_learners(self, failure: ActorFailure) -> None:
        """After a learner rank failed: the stacks of every rank when it was a deadline (the late rank and
        the peers it holds in a collective), then SIGKILL of every rank's processes. A rank stopped or blocked
        in C would not act on Ray's request to exit."""
        for rank, bundle in enumerate(self.placement.learner_bundles):
            if isinstance(failure, ActorTimeoutError) and rank < len(self.learner_pids):
                self._write_stacks(self.learners, rank, self.learner_pids[rank], bundle, str(failure))
        for rank, bundle in enumerate(self.placement.learner_bundles):
            if rank < len(self.learner_pids):
                self._kill_processes(bundle, self.learner_pids[rank], self.learners.name(rank))

    # ---- surviving a dead or stuck rollout worker ----------------------------------------------------

    def _settle(self, method: str, args: Sequence[Optional[tuple]], doing: str, timeout_s: float,
                first: Optional[PendingRollout] = None) -> dict:
        """{worker index: result} of `method` on the workers with args (the calls of `first` when they were
        sent already); failed workers are replaced and their calls re-issued until every call succeeded (or
        the restart budget is spent)."""
        results = {}
        calls, sent_to = (first.calls, first.sent_to) if first else (None, None)
        while True:
            if calls is None:
                todo = [a if i not in results else None for i, a in enumerate(args)]
                calls, sent_to = self.workers.submit_each(method, todo), list(self.workers.actors)
            results.update(zip(calls.indices, calls.settle(doing, timeout_s)))
            failed = {i: r for i, r in results.items() if isinstance(r, ActorFailure)}
            if not failed:
                return results
            # A worker replaced since the call was sent (in a weight sync) is new and healthy: only re-issue.
            self.replace_workers({i: f for i, f in failed.items() if self.workers.actors[i] is sent_to[i]})
            for i in failed:
                del results[i]
            calls = None

    def _sync_with_recovery(self, version: int, timeout: float) -> None:
        """Send update `version` to every engine. A receiver that fails it (a rollout worker dead, stuck or
        raising) is replaced, and the update is sent to all again (the re-formed group needs every member in
        the broadcast). A failure of the sender stops the run naming the learner rank: its own error, its
        death, or a push still stuck after the receivers it waited on were replaced."""
        sender_was_late = False
        while True:
            calls = self.learners.submit("push_weights", version)
            calls += self.workers.submit("receive_weights", version, self.update_meta)
            failures = [r for r in calls.settle(f"syncing weights (version {version})", timeout)
                        if isinstance(r, ActorFailure)]
            if not failures:
                self.version, self.learner_ahead = version, False
                return
            receivers = {r.index: r for r in failures if r.kind == self.workers.kind}
            senders = [r for r in failures if r.kind == self.learners.kind]
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
            self.replace_workers(receivers, push_weights=False)

    def replace_workers(self, failed: dict[int, ActorFailure], push_weights: bool = True) -> None:
        """Kill each failed worker's process tree, start a new one in the same bundle, re-form the group,
        then (unless the caller sends the update itself) push the current weights to every worker."""
        cfg = self.cfg
        if not failed:
            return
        if self.signals.requested():
            # Stopping anyway; and a scancel or time limit signals every Slurm step, the Ray nodes' too, so
            # a replacement would only die with them. The command reports the stop, this failure its echo.
            raise min(failed.items())[1]
        for index, failure in sorted(failed.items()):
            self.restarts += 1
            if self.restarts > cfg.cluster.max_worker_restarts:
                raise WorkerRestartsExhausted(
                    f"rollout worker {index} failed and cluster.max_worker_restarts={cfg.cluster.max_worker_restarts} "
                    f"replacements are used up; its last error: {failure}")
            log.warning("replacing rollout worker %d (%d of at most %d): %s", index, self.restarts,
                        cfg.cluster.max_worker_restarts, failure)
            bundle = self.placement.worker_bundles[index]
            if isinstance(failure, ActorTimeoutError):
                self._write_stacks(self.workers, index, self.worker_pids[index], bundle, str(failure))
            self._kill_worker(index)
            self.workers.actors[index] = cluster.start_worker(cfg, self.placement, self.model_path, index, bundle)
            self.worker_pids[index] = self.workers.call_one(index, "process_ids", doing="starting")
        self._join_weight_sync()
        if push_weights:
            # Every worker gets the learner's weights as they are now. If the learner has stepped since the last
            # push (learner.sync_every > 1), they are a new version: labelled as the old one they would make
            # batches look older than they are, and shards of two weight sets pass for one.
            version = self.version + 1 if self.learner_ahead else self.version
            if version != self.version:
                log.warning("the learner has stepped since version %d was pushed: every rollout worker gets its "
                            "current weights as version %d", self.version, version)
            self.sync(version)

    def _write_stacks(self, group: ActorGroup, index: int, pids: list[int], bundle: int, doing: str) -> None:
        """A stuck actor's Python stacks into <run>/faults/ (when the run has one), named in the log."""
        if self.faults_dir is None:
            return
        path = faults.write_stacks(group.name(index), pids, self.placement.strategy(bundle), self.faults_dir, doing)
        if path is not None:
            log.warning("%s: the stack of each of its threads is in %s", group.name(index), path)

    def _kill_worker(self, index: int) -> None:
        """SIGKILL the worker's processes and anything below them on its node (a stopped engine process
        ignores anything else, and would otherwise outlive its actor), then let Ray forget the actor."""
        self._kill_processes(self.placement.worker_bundles[index], self.worker_pids[index], self.workers.name(index))
        ray.kill(self.workers.actors[index])

    def _kill_processes(self, bundle: int, pids: list[int], name: str) -> None:
        """SIGKILL `pids` and everything below them, on the node of `bundle`; a warning if that fails (the
        node itself may be gone)."""
        try:
            ray.get(cluster.kill_process_tree.options(scheduling_strategy=self.placement.strategy(bundle))
                    .remote(pids), timeout=60)
        except Exception as exc:
            log.warning("%s: could not kill its processes: %s", name, exc)
