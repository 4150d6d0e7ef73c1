"""The cores an actor's CPU share maps to (`cluster.pin_cpus`): the driver numbers the bundles of each
node, and each actor binds itself to the cores of its number, so learner ranks and rollout engines
run side by side instead of taking turns on whatever core the OS picks.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence


def share_cores(slot: int, cores_per_actor: int, available: Sequence[int]) -> list[int]:
    """Cores [slot * n, (slot + 1) * n) of the node's sorted cores (wrapping around when the actors
    ask for more cores than the node has)."""
    if cores_per_actor < 1:
        raise ValueError(f"a pinned actor needs at least one whole core, got {cores_per_actor}")
    cores = sorted(available)
    return [cores[(slot * cores_per_actor + j) % len(cores)] for j in range(cores_per_actor)]


def pin_this_process(slot: Optional[int], cores_per_actor: int) -> Optional[list[int]]:
    """Bind this process (and the processes it starts later) to its share, with one torch thread per
    core; returns the cores, or None when `slot` is None (not pinned)."""
    if slot is None:
        return None
    import torch

    cores = share_cores(slot, cores_per_actor, os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
    return cores
