"""One GRPO training step on a rollout shard: old and reference log-probs, then learner.mu passes.

Gradient accumulation has to respect the loss aggregation across micro-batches and ranks: each
micro-batch loss is weighted so that the sum over micro-batches, averaged over ranks by DeepSpeed,
is exactly the aggregated loss of the whole step's batch.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from learner.finite_guard import GradientWatch, check_step
from learner.grpo import entropy_from_logits, group_advantages, grpo_loss, token_logprobs
from learner.model_inputs import EncodedPrompt, SampleBatch
from learner.policy import batch_kwargs
from protocol.batch import RolloutBatch

from protocol.config import Config

# grpo_loss statistics averaged over tokens into the step's metrics, and those averaged over the ratios
# the policy loss clips (tokens; sequences for grpo.policy_loss=gspo).
_TOKEN_STATS = ("kl", "tis/weight_mean", "tis/clipped_fraction")
_RATIO_STATS = ("clip_fraction", "clip_fraction_high", "clip_fraction_low", "ratio_mean")


@dataclasses.dataclass
class StepPlan:
    batch: RolloutBatch
    prompts: list[EncodedPrompt]
    micro_batches: list[SampleBatch]
    sample_indices: list[list[int]]  # the shard's sample indices of each micro-batch
    device: torch.device
    freeze_vision: bool
    share_prompts: bool = False  # one language-model pass per distinct prompt (learner/shared_prompt.py)


def _temperature(cfg: Config) -> float:
    # A greedy rollout (temperature 0) has no sampling distribution to correct for; score at 1.
    t = cfg.rollout.temperature
    return t if t > 0 else 1.0


def _forward_logprobs(module, batch: SampleBatch, feats, device, temperature, with_entropy=False, share=False):
    """Log-probs [B, T] of the tokens from position min_prompt_len on (and entropy if asked)."""
    logits = module(**batch_kwargs(batch, feats, device, share_prompts=share))[:, :-1]
    targets, _ = batch.completion_targets()
    logprobs = token_logprobs(logits, targets.to(device), temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), temperature)
    return logprobs, entropy


def completion_logprobs_of(module, batch: SampleBatch, device, temperature: float) -> list[list[float]]:
    """Per sample, the log-probs of its completion tokens, in order."""
    with torch.no_grad():
        logprobs, _ = _forward_logprobs(module, batch, None, device, temperature)
    _, mask = batch.completion_targets()
    return [row[m.bool()].tolist() for row, m in zip(logprobs.cpu(), mask)]


@torch.no_grad()
def _image_features(module, plan: StepPlan) -> Optional[list[torch.Tensor]]:
    """With a frozen vision tower, its features per prompt once for every pass of the step."""
    if not plan.freeze_vision:
        return None
    pixel = torch.cat([p.pixel_values for p in plan.prompts]).to(plan.device)
    grid = torch.cat([p.image_grid_thw for p in plan.prompts]).to(plan.device)
    feats = module(pixel_values=pixel, image_grid_thw=grid)
    return list(torch.split(feats, [sum(p.mm_token_type_ids) for p in plan.prompts]))


def _micro_feats(feats: Optional[list[torch.Tensor]], batch: SampleBatch):
    return None if feats is None else torch.cat([feats[k] for k in batch.prompt_keys])


@torch.no_grad()
def _all_logprobs(module, plan: StepPlan, feats, temperature) -> list[torch.Tensor]:
    return [_forward_logprobs(module, mb, _micro_feats(feats, mb), plan.device, temperature,
                              share=plan.share_prompts)[0] for mb in plan.micro_batches]


def reduce_over_ranks(values: list[float], world_size: int, device, op=dist.ReduceOp.SUM) -> list[float]:
    """The values combined over the learner ranks (each rank must call with as many values)."""
    if world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def micro_weights(plan: StepPlan, loss_agg: str, world_size: int) -> list[float]:
    """w_m with sum_m w_m * loss_m (averaged over ranks) = the aggregated loss of the whole batch.

    token_mean weighs by tokens over all ranks' tokens; the per-sequence modes by sequences.
    DeepSpeed averages gradients over ranks, hence the factor world_size.
    """
    if loss_agg == "token_mean":
        sizes = [float(mb.completion_mask.sum()) for mb in plan.micro_batches]
    else:
        sizes = [float(mb.input_ids.shape[0]) for mb in plan.micro_batches]
    (total,) = reduce_over_ranks([sum(sizes)], world_size, plan.device)
    return [world_size * s / total if total > 0 else 0.0 for s in sizes]


def _sampling_logprobs(plan: StepPlan, m: int, like: torch.Tensor) -> torch.Tensor:
    """The engine's per-token log-probs laid out like the learner's [B, T] completion frame."""
    mb, out = plan.micro_batches[m], torch.zeros_like(like)
    for row, i in enumerate(plan.sample_indices[m]):
        values = plan.batch.sampling_logprobs[i]
        cols = mb.completion_mask[row, mb.min_prompt_len:].nonzero().flatten()
        if len(values) != len(cols):
            raise ValueError(f"sample {i} (record {plan.batch.record_id_of(i)!r}): {len(values)} sampling "
                             f"logprobs for {len(cols)} completion tokens")
        out[row, cols.to(out.device)] = torch.tensor(values, dtype=out.dtype, device=out.device)
    return out


def _mismatch(plan: StepPlan, old: list[torch.Tensor], world_size: int) -> dict[str, float]:
    """|learner log-prob - engine log-prob| over all ranks' completion tokens: the train/inference
    mismatch (the learner's side from before the step's first update)."""
    total, count, worst = 0.0, 0.0, 0.0
    for m, lp in enumerate(old):
        mask = plan.micro_batches[m].completion_targets()[1].to(lp.device).bool()
        diff = (lp - _sampling_logprobs(plan, m, lp)).abs()[mask]
        total, count = total + float(diff.sum()), count + diff.numel()
        worst = max(worst, float(diff.max())) if diff.numel() else worst
    total, count = reduce_over_ranks([total, count], world_size, plan.device)
    (worst,) = reduce_over_ranks([worst], world_size, plan.device, op=dist.ReduceOp.MAX)
    return {"logprob_diff/mean_abs": total / max(count, 1.0), "logprob_diff/max_abs": worst}


def _check_same_micro_batch_count(plan: StepPlan, world_size: int) -> None:
    """Ranks that run different numbers of micro-batches deadlock in ZeRO's collectives: fail instead."""
    n = len(plan.micro_batches)
    most, neg_least = reduce_over_ranks([n, -n], world_size, plan.device, op=dist.ReduceOp.MAX)
    if most != -neg_least:
        raise ValueError(f"learner ranks got shards of {-neg_least:.0f} to {most:.0f} micro-batches; every rank "
                         f"needs the same number (give each rank as many samples)")


@dataclasses.dataclass
class _PassInputs:
    """What every optimisation pass of a step reuses."""
    feats: Optional[list[torch.Tensor]]  # frozen-tower image features per prompt, or None
    old: Optional[list[torch.Tensor]]  # per micro-batch; None = on-policy (mu == 1)
    ref: Optional[list[torch.Tensor]]  # per micro-batch; None without a KL term
    advantages: torch.Tensor  # per sample of the shard
    weights: list[float]  # per micro-batch loss weight (see micro_weights)
    temperature: float
    world_size: int


def run_train_step(engine, reference, plan: StepPlan, cfg: Config, world_size: int) -> dict[str, float]:
    """learner.mu optimiser steps over the plan's micro-batches; returns the step's metrics.

    Every metric is of the whole step over all ranks (each rank returns the same numbers), so
    that a driver may take any rank's, or their mean.
    """
    _check_same_micro_batch_count(plan, world_size)
    temperature, g = _temperature(cfg), cfg.grpo
    rewards = torch.tensor(plan.batch.total_rewards, dtype=torch.float32)
    feats = _image_features(engine, plan)
    inputs = _PassInputs(
        feats=feats, old=_all_logprobs(engine, plan, feats, temperature) if cfg.learner.mu > 1 else None,
        # A frozen tower is the same in policy and reference: the features are shared.
        ref=None if reference is None else _all_logprobs(reference, plan, feats, temperature),
        advantages=group_advantages(rewards, plan.batch.group_size, g.normalize_std, g.eps),
        weights=micro_weights(plan, g.loss_agg, world_size), temperature=temperature, world_size=world_size)
    passes = [_one_pass(engine, plan, inputs, cfg) for _ in range(cfg.learner.mu)]
    metrics = {k: sum(p[k] for p in passes) / len(passes) for k in passes[0] if k != "_logprobs"}
    metrics.update(_mismatch(plan, inputs.old if inputs.old is not None else passes[0]["_logprobs"], world_size))
    abs_sum, n = reduce_over_ranks([float(inputs.advantages.abs().sum()), inputs.advantages.numel()], world_size,
                             plan.device)
    metrics["advantage/abs_mean"] = abs_sum / n
    return metrics


def _one_pass(engine, plan: StepPlan, inputs: _PassInputs, cfg: Config) -> dict:
    """Forward/backward over every micro-batch, then one optimiser step (none if a value is not finite)."""
    g, last = cfg.grpo, len(plan.micro_batches) - 1
    lr = engine.get_lr()[0]  # the rate this step applies (the scheduler moves on inside step())
    sums = {k: 0.0 for k in ("loss", "entropy", "num_tokens", "num_ratios", *_TOKEN_STATS, *_RATIO_STATS)}
    seen, fallback_norm = [], None
    with GradientWatch(engine.module) as watch:
        for m, mb in enumerate(plan.micro_batches):
            engine.set_gradient_accumulation_boundary(m == last)
            logprobs, entropy = _forward_logprobs(engine, mb, _micro_feats(inputs.feats, mb), plan.device,
                                                  inputs.temperature, with_entropy=True, share=plan.share_prompts)
            mask = mb.completion_targets()[1].to(plan.device)
            sampling = _sampling_logprobs(plan, m, logprobs.detach()) if g.tis_cap > 0 else None
            loss, stats = grpo_loss(
                logprobs, None if inputs.old is None else inputs.old[m],
                None if inputs.ref is None else inputs.ref[m], inputs.advantages[plan.sample_indices[m]].to(plan.device),
                mask, g.beta, g.clip_low, g.clip_high, g.loss_agg, max_len=cfg.rollout.max_new_tokens,
                sampling_logprobs=sampling, tis_cap=g.tis_cap, policy_loss=g.policy_loss)
            engine.backward(loss * inputs.weights[m], scale_wrt_gas=False)
            seen.append(logprobs.detach())
            sums["loss"] += inputs.weights[m] * stats["loss"] / inputs.world_size  # this rank's share
            sums["entropy"] += float(torch.where(mask.bool(), entropy, torch.zeros_like(entropy)).sum())
            sums["num_tokens"] += stats["num_tokens"]
            sums["num_ratios"] += stats["num_ratios"]
            for k in _TOKEN_STATS:
                sums[k] += stats[k] * stats["num_tokens"]
            for k in _RATIO_STATS:
                sums[k] += stats[k] * stats["num_ratios"]
            if m == last:
                _guard(engine, watch, sums["loss"], lr, cfg, inputs.world_size, plan.device)
                if engine.zero_optimization_stage() == 0:
                    fallback_norm = plain_grad_norm(engine)  # DeepSpeed reports none without ZeRO
            engine.step()
    sums = dict(zip(sums, reduce_over_ranks(list(sums.values()), inputs.world_size, plan.device)))
    n, n_ratios = max(sums["num_tokens"], 1.0), max(sums["num_ratios"], 1.0)
    norm = engine.get_global_grad_norm()
    norm = fallback_norm if norm is None else norm
    return {"loss": sums["loss"], "entropy": sums["entropy"] / n, "num_tokens": sums["num_tokens"],
            **{k: sums[k] / n for k in _TOKEN_STATS}, **{k: sums[k] / n_ratios for k in _RATIO_STATS}, "lr": float(lr),
            "grad_norm": float(norm) if norm is not None else float("nan"), "_logprobs": seen}


def _guard(engine, watch: GradientWatch, loss_share: float, lr: float, cfg: Config, world_size: int,
           device) -> None:
    """Before the optimiser step: every rank raises if the step's loss, any rank's gradients or the
    rate are not finite. fp16 leaves gradients to DeepSpeed's loss scaler, whose overflows are
    expected and skipped."""
    grad_sq, bad_param = watch.squared_sum() if cfg.learner.precision != "fp16" else (0.0, None)
    loss, grad_sq = reduce_over_ranks([loss_share, grad_sq], world_size, device)
    check_step(loss, grad_sq, float(lr), bad_param, engine.global_steps + 1)


def plain_grad_norm(engine) -> float:
    """Global L2 norm of the (already averaged) gradients of an engine without ZeRO."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
