"""Ray: join or start a cluster, place learner and rollout actors, wire their process groups."""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from typing import Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from launcher.actor_group import ActorGroup
from launcher.config import Config
from protocol.profile import check_torch_for
from rollout_workers.engine import kv_cache_space

log = logging.getLogger(__name__)


def actor_env(cfg: Config) -> dict:
    """Environment every actor of the run gets: vLLM's CPU KV budget, quiet tokenizers and logs."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
        # vLLM logs a line per weight update at INFO; export VLLM_LOGGING_LEVEL=INFO to see them.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if (space := kv_cache_space(cfg.rollout.kv_cache_gib)) is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = space
    if cfg.cluster.device == "cpu":
        # Several actors share few cores; one OpenMP thread each avoids oversubscription stalls.
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.cluster.cpus_per_actor)))
    return env


def start_ray(cfg: Config) -> None:
    """Join cfg.cluster.ray_address or RAY_ADDRESS when given, else start a local instance. First,
    refuse a GPU run on a CPU-only torch (every command that uses the cluster starts here)."""
    check_torch_for(cfg.cluster.device, "driver")
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


def gcs_reachable(timeout_s: float = 2.0, address: Optional[str] = None) -> bool:
    """Whether this Ray cluster's GCS (at `address`, else the connected one's) still accepts connections.
    After a scancel or a time limit has stopped the Ray nodes, every Ray call (killing an actor, removing
    a placement group) would wait a minute or more for a GCS that is not coming back."""
    try:
        host, port = (address or ray.get_runtime_context().gcs_address).rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError, AttributeError):
        return False


class GcsWatch:
    """A daemon thread that checks every `period_s` that the Ray cluster's GCS still accepts connections,
    and calls `on_lost(seconds)` once it has not for `grace_s` (the head was killed, its node died). Ray's
    own client would end the process a minute later with a fatal line of its internal log; the caller
    ends it sooner, with a line of its own. While `hurry()` is true (a stop is under way, and the cluster
    is expected to go with it) the grace is `hurry_grace_s`. `stop()` before a deliberate shutdown."""

    def __init__(self, on_lost, period_s: float = 2.0, grace_s: float = 20.0, hurry=lambda: False,
                 hurry_grace_s: float = 4.0):
        import threading

        self.on_lost, self.period_s, self.grace_s = on_lost, period_s, grace_s
        self.hurry, self.hurry_grace_s = hurry, hurry_grace_s
        self.address = ray.get_runtime_context().gcs_address
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gcs-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import time

        lost_since = None
        while not self._stopped.wait(self.period_s):
            if gcs_reachable(address=self.address):
                lost_since = None
                continue
            lost_since = lost_since or time.monotonic()
            grace = self.hurry_grace_s if self.hurry() else self.grace_s
            if time.monotonic() - lost_since >= grace and not self._stopped.is_set():
                self.on_lost(time.monotonic() - lost_since)
                return

    def stop(self) -> None:
        self._stopped.set()


COLOCATED_GPU_SHARE = 0.5


def actor_gpus(cfg: Config, role: str) -> float:
    """The one rule for GPUs per actor: a learner rank (and the format warm-up) holds one GPU, a rollout
    worker one per tensor-parallel shard of its engine; colocated, each holds half of the GPU they share
    (Ray's share only places them together: vLLM's memory is bounded by rollout.gpu_memory_utilization).
    Nothing holds a GPU on the CPU profile."""
    if cfg.cluster.device != "gpu":
        return 0
    per_role = {"learner": 1, "worker": cfg.rollout.tensor_parallel_size}
    if role not in per_role:
        raise ValueError(f"unknown actor role {role!r}; expected one of {sorted(per_role)}")
    return COLOCATED_GPU_SHARE if cfg.cluster.colocate else per_role[role]


def _bundle(cfg: Config, role: str) -> dict:
    gpus = actor_gpus(cfg, role)
    return {"CPU": cfg.cluster.cpus_per_actor, **({"GPU": gpus} if gpus else {})}


@dataclasses.dataclass
class Placement:
    group: object
    learner_bundles: list[int]
    worker_bundles: list[int]
    node_slots: list[int] = dataclasses.field(default_factory=list)  # per bundle: its number on its node

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=bundle)

    def remove(self) -> None:
        remove_placement_group(self.group)


def place(cfg: Config, with_learners: bool = True, timeout_s: float = 600) -> Placement:
    """One bundle per learner rank, then one per rollout worker (disaggregated: no device is shared);
    colocated, one bundle per pair. Evaluation alone places the workers only."""
    if cfg.cluster.colocate:
        return _place_colocated(cfg, with_learners, timeout_s)
    learner = [_bundle(cfg, "learner") for _ in range(cfg.learner.num_ranks if with_learners else 0)]
    workers = [_bundle(cfg, "worker") for _ in range(cfg.rollout.num_workers)]
    group = _ready_group(learner + workers, f"{len(learner)} learner and {len(workers)} rollout bundles", timeout_s)
    n = len(learner)
    return Placement(group, list(range(n)), list(range(n, n + len(workers))), _node_slots(group))


def _node_slots(group) -> list[int]:
    """Per bundle, how many bundles before it share its node: its share of that node's cores."""
    nodes = ray.util.placement_group_table(group)["bundles_to_node_id"]
    seen: dict = {}
    slots = []
    for bundle in sorted(nodes):
        slots.append(seen.setdefault(nodes[bundle], 0))
        seen[nodes[bundle]] += 1
    return slots


def cpu_slot(cfg: Config, placement: Placement, bundle: int) -> Optional[int]:
    """The share an actor in `bundle` pins itself to (cluster.pin_cpus), or None: not pinned (GPU profile,
    a fractional CPU share, or colocated actors, which take turns anyway)."""
    c = cfg.cluster
    whole = c.cpus_per_actor >= 1 and c.cpus_per_actor == int(c.cpus_per_actor)
    if not c.pin_cpus or c.device != "cpu" or c.colocate or not whole:
        return None
    return placement.node_slots[bundle]


def _place_colocated(cfg: Config, with_learners: bool, timeout_s: float) -> Placement:
    """Bundle i holds learner rank i and rollout worker i: their CPUs and, on GPU, one whole GPU."""
    n = cfg.rollout.num_workers
    cpus = cfg.cluster.cpus_per_actor * (2 if with_learners else 1)
    bundle = {"CPU": cpus, **({"GPU": 1} if cfg.cluster.device == "gpu" else {})}
    group = _ready_group([dict(bundle) for _ in range(n)], f"{n} colocated bundles", timeout_s)
    return Placement(group, list(range(n)) if with_learners else [], list(range(n)))


def _ready_group(bundles: list[dict], what: str, timeout_s: float):
    _check_resources_suffice(bundles, what)
    group = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(f"Ray could not place {what} ({bundles}) within {timeout_s:.0f} s; cluster has "
                           f"{ray.cluster_resources()}")
    return group


# What to change when a resource falls short (the GPU hint first: GPUs are checked before CPUs).
_SHORTFALL_HINTS = {
    "GPU": "use fewer learner ranks or rollout workers, or cluster.colocate=true to put each learner rank and its "
           "engine on one GPU",
    "CPU": "lower cluster.cpus_per_actor (every learner rank and rollout worker reserves it; a colocated pair "
           "reserves twice it), use fewer actors, or give Ray more CPUs (sbatch --cpus-per-task)",
}


def _check_resources_suffice(bundles: list[dict], what: str) -> None:
    """More GPUs or CPUs than the cluster has, in all or on any one node, can never be placed: say so at once
    instead of after the placement's timeout."""
    total = ray.cluster_resources()
    largest_node = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for resource, amount in node.get("Resources", {}).items():
                largest_node[resource] = max(largest_node.get(resource, 0), amount)
    for resource, hint in _SHORTFALL_HINTS.items():
        need, have = sum(b.get(resource, 0) for b in bundles), total.get(resource, 0)
        if need > have + 1e-9:
            raise RuntimeError(f"{what} need {need:g} {resource}s, the Ray cluster has {have:g}; {hint}")
        biggest = max((b.get(resource, 0) for b in bundles), default=0)
        if biggest > largest_node.get(resource, 0) + 1e-9:
            raise RuntimeError(f"one of {what} needs {biggest:g} {resource}s on one node, the largest node of the "
                               f"Ray cluster has {largest_node.get(resource, 0):g}; {hint}")


# Group ports are drawn below the node's ephemeral range (the ports the kernel hands out for port 0 and for
# every outgoing connection, Ray's own included): a port drawn there can be taken by anyone's connection in
# the seconds before rank 0 listens on it (EADDRINUSE), one drawn below it only by another listener.
LOWEST_GROUP_PORT = 20000


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(count: int, tries: int = 200) -> list[int]:
    """`count` distinct ports free on this node now, below its ephemeral range when there is room, else
    from the kernel (port 0)."""
    import random

    low = ephemeral_range()[0]
    pick = random.Random(os.urandom(8))
    ports, socks = [], []
    try:
        for _ in range(tries if low - LOWEST_GROUP_PORT > 1000 else 0):
            if len(ports) == count:
                break
            s = socket.socket()
            try:
                s.bind(("", pick.randrange(LOWEST_GROUP_PORT, low)))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(s.getsockname()[1])
        while len(ports) < count:
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@ray.remote(num_cpus=0)
def _address_and_free_ports(count: int) -> tuple[str, list[int]]:
    return ray.util.get_node_ip_address(), free_ports(count)


def rendezvous(placement: Placement, bundle: int, count: int) -> tuple[str, list[int]]:
    """An address and `count` distinct free ports on the node that holds `bundle` (where rank 0 of
    the groups will live); ports for several groups must come from one call so they never collide."""
    return ray.get(_address_and_free_ports.options(scheduling_strategy=placement.strategy(bundle)).remote(count))


def group_ports(cfg: Config, drawn: list[int]) -> tuple[int, int]:
    """(learner group port, weight-sync port) from two distinct free ports of one `rendezvous` call.

    A configured cluster.master_port is used for the learners' group; the sync port is then the first
    drawn port that differs from it, so the two never collide.
    """
    if len(drawn) < 2 or len(set(drawn)) != len(drawn):
        raise ValueError(f"need two distinct drawn ports, got {drawn}")
    learner = cfg.cluster.master_port or drawn[0]
    return learner, next(p for p in drawn if p != learner)


def start_learners(cfg: Config, placement: Placement, model_path: str, addr: str, port: int) -> ActorGroup:
    from learner.actor import LearnerRank

    cls = ray.remote(LearnerRank)
    world = cfg.learner.num_ranks
    return ActorGroup("learner rank", [
        cls.options(num_cpus=cfg.cluster.cpus_per_actor, num_gpus=actor_gpus(cfg, "learner"), max_concurrency=1,
                    scheduling_strategy=placement.strategy(b))
        .remote(cfg, model_path, rank, world, addr, port, cpu_slot=cpu_slot(cfg, placement, b))
        for rank, b in enumerate(placement.learner_bundles)
    ])


def start_worker(cfg: Config, placement: Placement, model_path: str, index: int, bundle: int):
    """One rollout worker actor in `bundle` (a replacement goes into its predecessor's bundle)."""
    from rollout_workers.worker import RolloutWorker

    return (ray.remote(RolloutWorker)
            .options(num_cpus=cfg.cluster.cpus_per_actor, num_gpus=actor_gpus(cfg, "worker"),
                     scheduling_strategy=placement.strategy(bundle))
            .remote(cfg, model_path, index, cpu_slot=cpu_slot(cfg, placement, bundle)))


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


def wait_started(groups: list[ActorGroup], timeout_s: Optional[float] = None) -> None:
    """Return once every actor's constructor has finished (a learner has loaded its model, an engine
    has started, CUDA graphs captured); a constructor that failed is raised naming its actor."""
    calls = [g.submit("__ray_ready__") for g in groups]
    sum(calls[1:], calls[0]).wait("starting up", timeout_s=timeout_s)


def start_colocated(cfg: Config, placement: Placement, model_path: str, addr: str,
                    port: int) -> tuple[ActorGroup, ActorGroup]:
    """Engines first, alone on their GPUs while vLLM measures the memory it may take; then they sleep
    (GPU) and the learner ranks load beside them."""
    workers = start_workers(cfg, placement, model_path)
    wait_started([workers])
    workers.call("sleep", doing="putting the engines to sleep before the learners load")
    learners = start_learners(cfg, placement, model_path, addr, port)
    wait_started([learners])
    return learners, workers


def exit_now(code: int, last_line: str = "") -> None:
    """End the process from any thread once the Ray cluster is gone: stop this process's own Ray
    processes, silence the log (the main thread goes on meanwhile, and would report the actors it loses),
    print `last_line` last, and skip Ray's exit handler (it would wait for the gone GCS)."""
    stop_ray_descendants()
    logging.disable(logging.CRITICAL)
    logging.shutdown()
    sys.stdout.flush()
    if last_line:
        print(last_line, file=sys.stderr)
    sys.stderr.flush()
    os._exit(code)


def stop_ray_descendants(timeout_s: float = 10) -> None:
    """Ray processes started by this one that ray.shutdown left: when a signal interrupts ray.init, Ray's
    exit handler kills its raylet but not the agents the raylet started. (A joined cluster's processes
    are not descendants of the driver and are left alone.)"""
    import psutil

    def is_ray(p) -> bool:
        try:
            return p.name().startswith(("ray::", "raylet", "gcs_server", "VLLM::")) or \
                any("/ray/" in part for part in p.cmdline())  # the ray package, a session dir
        except psutil.Error:
            return False

    procs = [p for p in psutil.Process().children(recursive=True) if is_ray(p)]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
