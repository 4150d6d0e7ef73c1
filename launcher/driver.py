"""The single controller: draw prompts, generate and score, train, sync weights, log. Owns no model tensor."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import ray

from launcher import cluster
from launcher.config import Config
from medvqa.batch import RolloutBatch
from medvqa.weight_update import resolve_backend

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Actors:
    learners: list
    workers: list
    placement: cluster.Placement


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
    task = ray.remote(num_cpus=cfg.cluster.cpus_per_actor, num_gpus=1 if cfg.cluster.device == "gpu" else 0)(
        warmup_format)
    log.info("format warm-up: %d steps at lr %g", cfg.train.format_warmup_steps, cfg.train.format_warmup_lr)
    return ray.get(task.remote(model_path, str(out), records, cfg.train.format_warmup_steps,
                               cfg.train.format_warmup_lr, cfg.train.seed, cfg.model.min_pixels,
                               cfg.model.max_pixels))


def start_actors(cfg: Config, model_path: str) -> Actors:
    placement = cluster.place(cfg)
    learners = cluster.start_learners(cfg, placement, model_path)
    workers = cluster.start_workers(cfg, placement, model_path)
    world = 1 + cfg.rollout.num_workers * cfg.rollout.tensor_parallel_size
    addr, (port,) = cluster.rendezvous(placement, placement.learner_bundles[0], 1)
    backend = resolve_backend(cfg.cluster.sync_backend, cfg.cluster.device)
    joins = [lr.init_weight_sync.remote(addr, port, world, backend) for lr in learners]
    joins += [w.init_weight_sync.remote(addr, port, 1 + i * cfg.rollout.tensor_parallel_size, world, backend)
              for i, w in enumerate(workers)]
    ray.get(joins)
    return Actors(learners, workers, placement)


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous shards whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class ActorDiedError(RuntimeError):
    """An actor of the run died mid-step; the message names which one and what the step was doing."""


def gather(futures: list, names: list[str], doing: str) -> list:
    """ray.get in completion order, so a dead actor is reported at once (its peers may be blocked in a
    collective waiting for it) and by name instead of a bare Ray traceback."""
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


def generate(actors: Actors, records: list, seed: int) -> RolloutBatch:
    shards = split_evenly(records, len(actors.workers))
    live = [(i, w, s) for i, (w, s) in enumerate(zip(actors.workers, shards)) if s]
    futures = [w.generate.remote(s, seed + i) for i, w, s in live]
    return RolloutBatch.concat(gather(futures, [f"rollout worker {i}" for i, _, _ in live], "generating"))


def shard_for_rank(batch: RolloutBatch, rank: int, world: int) -> RolloutBatch:
    """Whole groups per rank (prompts rank::world) so each rank computes its own group advantages."""
    return batch.select_prompts(list(range(rank, len(batch.records), world)))


def train(actors: Actors, batch: RolloutBatch) -> dict:
    world = len(actors.learners)
    futures = [lr.train_on.remote(shard_for_rank(batch, r, world)) for r, lr in enumerate(actors.learners)]
    stats = gather(futures, [f"learner rank {r}" for r in range(world)], "training")
    # Ranks report their own shard's numbers; the step's value is their mean.
    return {k: sum(s[k] for s in stats) / world for k in stats[0]}


def sync_weights(actors: Actors, version: int) -> None:
    meta = ray.get(actors.learners[0].weight_update_meta.remote())
    futures = [lr.push_weights.remote(version) for lr in actors.learners]
    futures += [w.receive_weights.remote(version, meta) for w in actors.workers]
    names = [f"learner rank {r}" for r in range(len(actors.learners))]
    names += [f"rollout worker {i}" for i in range(len(actors.workers))]
    gather(futures, names, f"syncing weights (version {version})")


def save_policy(actors: Actors, out_dir: Path) -> None:
    """Every rank takes part (ZeRO-3 gathers the parameters); rank 0 writes the HF checkpoint."""
    futures = [lr.save.remote(str(out_dir)) for lr in actors.learners]
    gather(futures, [f"learner rank {r}" for r in range(len(futures))], f"saving {out_dir}")


def rollout_metrics(batch: RolloutBatch) -> dict:
    n = batch.num_samples
    lengths = [len(c) for c in batch.completion_token_ids]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = {f"reward/{k}": mean(v) for k, v in batch.rewards.items()}
    out["reward/total"] = mean(batch.total_rewards)
    out["response_length/mean"] = mean(lengths)
    out["response_length/max"] = max(lengths)
    out["response_length/truncated_fraction"] = sum(f == "length" for f in batch.finish_reasons) / n
    groups = [batch.total_rewards[i:i + batch.group_size] for i in range(0, n, batch.group_size)]
    out["reward/zero_std_group_fraction"] = sum(max(g) == min(g) for g in groups) / len(groups)
    return out


def sample_rows(batch: RolloutBatch, count: int) -> list[dict]:
    from medvqa.prompt import question_text

    rows = []
    for i in range(min(count, batch.num_samples)):
        rec = batch.record_of(i)
        rows.append({"image": rec.load_image(), "prompt": question_text(rec), "completion": batch.completion_texts[i],
                     "reward/total": batch.total_rewards[i], "answer": rec.answer, "modality": rec.modality,
                     "record_id": rec.id, **{f"reward/{k}": v[i] for k, v in batch.rewards.items()}})
    return rows


def stop_actors(actors: Actors) -> None:
    for w in actors.workers:
        try:
            ray.get(w.shutdown.remote(), timeout=60)
        except Exception as exc:  # a worker that already died must not hide the run's own error
            log.warning("rollout worker shutdown failed: %s", exc)
    for a in actors.learners + actors.workers:
        ray.kill(a)
    actors.placement.remove()
