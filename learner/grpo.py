"""The GRPO objective as short pure functions over tensors (torch only).

Shapes: B sequences (completions), T completion positions, V vocabulary entries. `mask` is
[B, T], true on completion tokens and false on padding. Every masked quantity is selected with
`torch.where`, never multiplied by the mask, so that garbage (even inf) on padding cannot
leak into the loss as inf * 0 = nan.

The objective per completion token, with A the group advantage of its sequence:
    ratio = exp(logprob - old_logprob)
    pg    = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    w     = min(exp(old_logprob - sampling_logprob), tis_cap)   (truncated importance weight, no gradient)
    kl    = exp(ref - logprob) - (ref - logprob) - 1           (k3, always >= 0)
    loss  = aggregate(w * pg + beta * kl)
`old_logprob` is the learner's policy at the start of the step; `sampling_logprob` is what the rollout
engine reported for the token it drew, from the weights it held then (older ones when generation runs
ahead of training) and with its own kernels. w corrects the policy gradient for that gap (truncated
importance sampling, as OpenRLHF and TRL apply it); tis_cap = 0 leaves it out (w = 1).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
# exp() of a log-ratio beyond this overflows float32 long before it means anything; such
# tokens are clipped anyway (or stale beyond repair), so the bound only keeps the loss finite.
MAX_LOG_RATIO = 20.0


def group_advantages(rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-4) -> Tensor:
    """(r - group mean) / (group std + eps) over groups of `group_size` consecutive samples.

    The std is the unbiased one (torch.std's default, divisor G - 1), as in the paper's
    trainer. A group whose rewards are all equal carries no signal and gets exactly 0 (not a
    rounding residue of r - mean, and never nan, even for G = 1). `normalize_std=False` gives
    Dr.GRPO's r - mean.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    values = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
    grouped = values.reshape(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centered[:, :1])
        centered = centered / (std + eps)
    flat = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(centered), centered).reshape(-1)


def _upcast(x: Tensor) -> Tensor:
    """Half-precision logits are read in float32: logsumexp in bf16 loses the small logprobs."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(tokens[b, t]) under softmax(logits[b, t] / temperature), [B, T].

    `logits[:, t]` must already predict `tokens[:, t]` (the caller drops the last prompt
    position's shift). One sequence at a time, so only one [T, V] copy exists at once instead
    of a full [B, T, V] log-softmax. float32 for bf16/fp16 logits, else the logits' dtype.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        row = _upcast(row_logits)
        if temperature != 1.0:
            row = row / temperature
        picked = row.gather(-1, row_tokens.long().unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


# Positions per slice in entropy_from_logits: its temporaries are a few [slice, V] copies, not [T, V] ones
# (at the paper's 151,936-row vocabulary and 512 completion positions, 0.3 GB each in float32).
ENTROPY_SLICE = 128


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) at each position, [B, T] (dtype as token_logprobs).

    H = logsumexp(z) - sum softmax(z) * z, ENTROPY_SLICE positions of one sequence at a time.
    """
    rows = []
    for row_logits in logits:
        parts = []
        for part in torch.split(row_logits, ENTROPY_SLICE):
            z = _upcast(part) / temperature if temperature != 1.0 else _upcast(part)
            parts.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def _per_sequence(advantages: Tensor, like: Tensor) -> Tensor:
    if advantages.dim() != 1 or advantages.shape[0] != like.shape[0]:
        raise ValueError(f"advantages must be [B={like.shape[0]}], got shape {tuple(advantages.shape)}")
    return advantages.to(like.dtype).unsqueeze(-1)


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped policy loss per token and where the clipped branch is the one taken.

    Returns (per_token_loss [B, T], clipped_mask [B, T] bool). The clipped branch is chosen
    only where it is strictly smaller, so at ratio 1 the gradient is the plain policy gradient.
    Where clipped_mask is true the token gives no gradient.
    """
    adv = _per_sequence(advantages, logprobs)
    log_ratio = (logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    clipped_mask = clipped < unclipped
    return -torch.where(clipped_mask, clipped, unclipped), clipped_mask


def truncated_is_weights(old_logprobs: Tensor, sampling_logprobs: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """min(pi_old / pi_sample, cap) per token, and where the cap binds; both [B, T], no gradient.

    The weight only rescales a token's policy gradient; it is not optimised through. Weights below
    1 are kept as they are; a token the learner's policy now favours far more than the sampler did
    would get a large weight, and the cap bounds the variance it adds.
    """
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be positive, got {cap}")
    log_w = (old_logprobs.detach() - sampling_logprobs.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    weights = torch.exp(log_w)
    truncated = weights > cap
    return torch.where(truncated, torch.full_like(weights, cap), weights), truncated


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(d) - d - 1 with d = ref - logprob (>= 0)."""
    d = (ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(d) - d - 1.0


def aggregate_loss(per_token_loss: Tensor, mask: Tensor, mode: str, max_len: Optional[int] = None) -> Tensor:
    """Reduce [B, T] token losses over completion tokens to a scalar.

    token_mean:              sum / number of completion tokens in the batch (DAPO).
    seq_mean_token_mean:     mean over sequences of each sequence's token mean (the paper's);
                             a sequence without tokens counts as 0.
    seq_mean_token_sum_norm: sum / (B * max_len), a constant normaliser (Dr.GRPO);
                             max_len defaults to T.
    """
    m = mask.bool()
    masked = torch.where(m, per_token_loss, torch.zeros_like(per_token_loss))
    if mode == "token_mean":
        return masked.sum() / m.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        return (masked.sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()
    if mode == "seq_mean_token_sum_norm":
        norm = mask.shape[1] if max_len is None else max_len
        return masked.sum() / (mask.shape[0] * norm)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(LOSS_AGGREGATIONS)}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the true entries of `mask` (0 when there are none)."""
    m = mask.bool()
    return torch.where(m, values, torch.zeros_like(values)).sum() / m.sum().clamp(min=1)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Optional[Tensor],
    ref_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    beta: float,
    clip_low: float,
    clip_high: float,
    loss_agg: str,
    max_len: Optional[int] = None,
    sampling_logprobs: Optional[Tensor] = None,
    tis_cap: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss (a scalar to backpropagate) and detached statistics as python floats.

    `old_logprobs=None` means the learner's policy at the start of the step is these very weights
    (one pass per batch): the ratio is exactly 1 and only its gradient matters. With
    `sampling_logprobs` and `tis_cap > 0` each token's policy loss is weighted by
    `truncated_is_weights(old, sampling_logprobs, tis_cap)`; otherwise by 1. With beta == 0 or no
    reference the KL term is not computed and `kl` is reported as 0.0.
    """
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    pg, clipped = clipped_surrogate(logprobs, old, advantages, clip_low, clip_high)
    tis = None
    if sampling_logprobs is not None and tis_cap > 0:
        tis = truncated_is_weights(old, sampling_logprobs, tis_cap)
    per_token = pg if tis is None else tis[0] * pg
    kl = None
    if beta != 0 and ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    loss = aggregate_loss(per_token, mask, loss_agg, max_len)
    stats = _loss_stats(loss, pg, kl, clipped, logprobs, old, advantages, mask, loss_agg, max_len)
    stats.update(_tis_stats(tis, mask))
    return loss, stats


@torch.no_grad()
def _tis_stats(tis: Optional[tuple[Tensor, Tensor]], mask: Tensor) -> dict[str, float]:
    if tis is None:
        return {"tis/weight_mean": 1.0, "tis/clipped_fraction": 0.0}
    weights, truncated = tis
    return {"tis/weight_mean": float(masked_mean(weights, mask)),
            "tis/clipped_fraction": float(masked_mean(truncated.float(), mask))}


@torch.no_grad()
def _loss_stats(loss, pg, kl, clipped, logprobs, old, advantages, mask, loss_agg, max_len) -> dict[str, float]:
    m = mask.bool()
    ratio = torch.exp((logprobs - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    adv = _per_sequence(advantages, logprobs).expand_as(logprobs)
    has_tokens = bool(m.any())
    return {
        "loss": float(loss),
        "pg_loss": float(aggregate_loss(pg, m, loss_agg, max_len)),  # before the importance weights
        "kl": float(masked_mean(kl, m)) if kl is not None else 0.0,
        "clip_fraction": float(masked_mean(clipped.float(), m)),
        # Which side clips tells whether clip_low or clip_high (DAPO's clip-higher) binds.
        "clip_fraction_high": float(masked_mean((clipped & (adv > 0)).float(), m)),
        "clip_fraction_low": float(masked_mean((clipped & (adv < 0)).float(), m)),
        "ratio_mean": float(masked_mean(ratio, m)),
        "ratio_max": float(ratio[m].max()) if has_tokens else 0.0,
        "ratio_min": float(ratio[m].min()) if has_tokens else 0.0,
        "num_tokens": float(m.sum()),
    }
