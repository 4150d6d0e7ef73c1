"""Ray: join or start a cluster, place learner and rollout actors, wire their process groups."""
from __future__ import annotations

import dataclasses
import logging
import os
import socket

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from launcher.actor_group import ActorGroup
from launcher.config import Config

log = logging.getLogger(__name__)


def actor_env(cfg: Config) -> dict:
    """Environment every actor of the run gets: vLLM's CPU KV budget, quiet tokenizers and logs."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.kv_cache_gib),
        # vLLM logs a line per weight update at INFO; export VLLM_LOGGING_LEVEL=INFO to see them.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if cfg.cluster.device == "cpu":
        # Several actors share few cores; one OpenMP thread each avoids oversubscription stalls.
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.cluster.cpus_per_actor)))
    return env


def start_ray(cfg: Config) -> None:
    """Join cfg.cluster.ray_address or RAY_ADDRESS when given, else start a local instance."""
    if ray.is_initialized():
        return
    address = cfg.cluster.ray_address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": actor_env(cfg)}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    needed = cfg.cluster.cpus_per_actor * (cfg.learner.num_ranks + cfg.rollout.num_workers) + 1
    num_cpus = cfg.cluster.num_cpus or max(int(needed + 0.999), os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False, log_to_driver=True)


def actor_gpus(cfg: Config, role: str) -> int:
    """The one rule for GPUs per actor: a learner rank (and the format warm-up) holds one GPU, a rollout
    worker one per tensor-parallel shard of its engine; nothing holds a GPU on the CPU profile."""
    if cfg.cluster.device != "gpu":
        return 0
    per_role = {"learner": 1, "worker": cfg.rollout.tensor_parallel_size}
    if role not in per_role:
        raise ValueError(f"unknown actor role {role!r}; expected one of {sorted(per_role)}")
    return per_role[role]


def _bundle(cfg: Config, role: str) -> dict:
    gpus = actor_gpus(cfg, role)
    return {"CPU": cfg.cluster.cpus_per_actor, **({"GPU": gpus} if gpus else {})}


@dataclasses.dataclass
class Placement:
    group: object
    learner_bundles: list[int]
    worker_bundles: list[int]

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=bundle)

    def remove(self) -> None:
        remove_placement_group(self.group)


def place(cfg: Config, with_learners: bool = True, timeout_s: float = 600) -> Placement:
    """One bundle per learner rank, then one per rollout worker (disaggregated: no device is shared).
    Evaluation alone places the workers only."""
    learner = [_bundle(cfg, "learner") for _ in range(cfg.learner.num_ranks if with_learners else 0)]
    workers = [_bundle(cfg, "worker") for _ in range(cfg.rollout.num_workers)]
    group = placement_group(learner + workers, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        raise RuntimeError(f"Ray could not place {len(learner)} learner and {len(workers)} rollout bundles "
                           f"({learner + workers}) within {timeout_s:.0f} s; cluster has {ray.cluster_resources()}")
    n = len(learner)
    return Placement(group, list(range(n)), list(range(n, n + len(workers))))


@ray.remote(num_cpus=0)
def _address_and_free_ports(count: int) -> tuple[str, list[int]]:
    ports, socks = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ray.util.get_node_ip_address(), ports


def rendezvous(placement: Placement, bundle: int, count: int) -> tuple[str, list[int]]:
    """An address and `count` distinct free ports on the node that holds `bundle` (where rank 0 of
    the groups will live); ports for several groups must come from one call so they never collide."""
    return ray.get(_address_and_free_ports.options(scheduling_strategy=placement.strategy(bundle)).remote(count))


def start_learners(cfg: Config, placement: Placement, model_path: str, addr: str, port: int) -> ActorGroup:
    from learner.actor import LearnerRank

    port = cfg.cluster.master_port or port
    cls = ray.remote(LearnerRank)
    world = cfg.learner.num_ranks
    return ActorGroup("learner rank", [
        cls.options(num_cpus=cfg.cluster.cpus_per_actor, num_gpus=actor_gpus(cfg, "learner"), max_concurrency=1,
                    scheduling_strategy=placement.strategy(b))
        .remote(cfg, model_path, rank, world, addr, port)
        for rank, b in enumerate(placement.learner_bundles)
    ])


def start_worker(cfg: Config, placement: Placement, model_path: str, index: int, bundle: int):
    """One rollout worker actor in `bundle` (a replacement goes into its predecessor's bundle)."""
    from rollout_workers.worker import RolloutWorker

    return (ray.remote(RolloutWorker)
            .options(num_cpus=cfg.cluster.cpus_per_actor, num_gpus=actor_gpus(cfg, "worker"),
                     scheduling_strategy=placement.strategy(bundle))
            .remote(cfg, model_path, index))


def start_workers(cfg: Config, placement: Placement, model_path: str) -> ActorGroup:
    return ActorGroup("rollout worker", [start_worker(cfg, placement, model_path, i, b)
                                         for i, b in enumerate(placement.worker_bundles)])


@ray.remote(num_cpus=0)
def kill_process_tree(pids: list[int]) -> int:
    """SIGKILL the processes and every process below them (run on their node); returns how many."""
    import psutil

    procs = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += root.children(recursive=True) + [root]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return len(procs)
