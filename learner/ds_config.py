"""DeepSpeed's config, the optimiser and the learning-rate schedule, all from `cfg.learner`."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from protocol.config import Config

from protocol.choices import PRECISION_DTYPES

ZERO_STAGES = (0, 1, 2, 3)
LR_SCHEDULES = ("constant", "cosine", "linear")


def torch_dtype(precision: str) -> torch.dtype:
    """The learner's parameter dtype for `learner.precision`."""
    return getattr(torch, PRECISION_DTYPES[precision])


def samples_per_rank(cfg: Config) -> int:
    """This rank's share of one rollout batch: whole groups, the prompts split evenly over ranks."""
    prompts = cfg.rollout.prompts_per_step // cfg.learner.num_ranks
    return max(1, prompts) * cfg.rollout.group_size


def micro_batches_per_step(cfg: Config) -> int:
    """Gradient-accumulation steps so that one optimiser step consumes this rank's whole share."""
    return math.ceil(samples_per_rank(cfg) / cfg.learner.micro_batch_size)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The engine config of the trained policy (ZeRO stage, precision, clipping, batch geometry)."""
    lc = cfg.learner
    accumulation = micro_batches_per_step(cfg)
    zero: dict = {"stage": lc.zero_stage}
    if lc.zero_stage > 0:
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = lc.zero_bucket_elements
    if lc.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = lc.zero3_persistence_threshold
    if lc.offload_optimizer and lc.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.cluster.device == "gpu"}
    return {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": lc.micro_batch_size * accumulation * world_size,
        "gradient_clipping": float(lc.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": lc.precision == "bf16"},
        "fp16": {"enabled": lc.precision == "fp16", "initial_scale_power": 16},
        # The optimiser is torch's AdamW, passed in: DeepSpeed's FusedAdam needs CUDA, and its
        # CPUAdam needs a compiled extension. Both flags let ZeRO accept a client optimiser.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def reference_config(cfg: Config) -> dict:
    """An optimiser-less ZeRO-3 engine for the frozen reference: partitioned like the policy."""
    lc = cfg.learner
    return {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": lc.zero3_persistence_threshold},
        "bf16": {"enabled": lc.precision == "bf16"},
        "fp16": {"enabled": lc.precision == "fp16"},
        "steps_per_print": 10**9,
    }


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    lc = cfg.learner
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the policy has no trainable parameters (check model.freeze_vision and the checkpoint)")
    return torch.optim.AdamW(trainable, lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay, eps=1e-8)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak rate at optimiser step k (0-based): linear warmup, then the schedule.

    Warmup starts at 1/warmup rather than 0 so that the first step is not wasted.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r} (learner.lr_schedule)")

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (k - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """One scheduler step per optimiser step; a run makes train.steps * learner.mu of them."""
    total = max(1, cfg.train.steps * cfg.learner.mu)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.learner.lr_schedule, cfg.learner.warmup_steps, total))
