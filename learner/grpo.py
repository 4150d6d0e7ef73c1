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

`pg` is one of POLICY_LOSSES (`grpo.policy_loss`); w and the KL term compose with each the same way:
    ppo_clip  the line above (the default).
    gspo      GSPO (Zheng et al. 2025): one ratio per sequence, s = exp(token mean of logprob - old_logprob),
              clipped as above at the sequence level; see gspo_surrogate. Needs loss_agg seq_mean_token_mean.
    cispo     CISPO (MiniMax-M1, 2025): pg = -sg[clip(ratio, 1 - clip_low, 1 + clip_high)] * A * logprob; the
              clipped ratio is a weight without gradient, so no token loses its gradient; see cispo_surrogate.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
POLICY_LOSSES = ("ppo_clip", "gspo", "cispo")
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


def gspo_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """GSPO's clipped sequence loss laid out on the sequence's tokens, which sequences are clipped, their ratios.

    s_i = exp(mean over sequence i's completion tokens of logprob - old_logprob), the length-normalised
    sequence ratio, and L_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i), strictly smaller
    branch as in clipped_surrogate. Each token carries GSPO's token-level ratio s_i,t = sg[s_i] pi_t / sg[pi_t]:
    its value is s_i, and d s_i,t / d logprob_t = s_i = |y_i| d s_i / d logprob_t. So the mean of a sequence's
    token losses (loss_agg seq_mean_token_mean) has the value and the gradient of L_i itself, and a per-token
    weight (truncated importance sampling) scales that token's own share of the gradient, as for ppo_clip.
    GSPO's paper clips at clip_low 3e-4, clip_high 4e-4: sequence ratios stay much nearer 1 than token ratios,
    and PPO's 0.2 seldom binds. Returns ([B, T] loss, [B] clipped, [B] ratio; a sequence without tokens: 1).
    """
    m = mask.bool()
    lp = torch.where(m, logprobs, torch.zeros_like(logprobs))  # padding may hold anything, even inf
    diff = torch.where(m, lp - old_logprobs, torch.zeros_like(lp))
    log_seq = (diff.sum(dim=1) / m.sum(dim=1).clamp(min=1)).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).detach()
    token_log_ratio = log_seq.unsqueeze(-1) + (lp - lp.detach())  # value log s_i exactly (x - x == 0)
    per_token, clipped = clipped_surrogate(token_log_ratio, torch.zeros_like(lp), advantages, clip_low, clip_high)
    return per_token, clipped.any(dim=1), torch.exp(log_seq)


def cispo_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """CISPO's policy loss per token, -sg[clip(ratio, 1 - clip_low, 1 + clip_high)] * A * logprob, and where the
    ratio was clipped; both [B, T].

    The clipped ratio is a weight without gradient: a clipped token keeps its gradient, scaled by the bound,
    where ppo_clip would drop it. MiniMax-M1 set no lower bound and tuned only the upper one: clip_low >= 1
    puts the lower bound at or below 0, which a ratio never reaches. The loss's value is not PPO's (it holds
    logprob); its gradient is -weight * A per token, PPO's at ratio 1.
    """
    adv = _per_sequence(advantages, logprobs)
    ratio = torch.exp((logprobs.detach() - old_logprobs.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    low, high = 1.0 - clip_low, 1.0 + clip_high
    clipped = (ratio < low) | (ratio > high)
    return -ratio.clamp(low, high) * adv * logprobs, clipped


def policy_loss_conflict(policy_loss: str, loss_agg: str) -> Optional[str]:
    """Why `policy_loss` does not run with `loss_agg` (the keys named), or None when they compose."""
    if policy_loss not in POLICY_LOSSES:
        return f"unknown policy loss {policy_loss!r}; expected one of {', '.join(POLICY_LOSSES)}"
    if policy_loss == "gspo" and loss_agg != "seq_mean_token_mean":
        return (f"grpo.policy_loss=gspo needs grpo.loss_agg=seq_mean_token_mean, got {loss_agg!r}: GSPO's loss is "
                "one value per sequence, length-normalised by its ratio, and GSPO weighs sequences equally; "
                "token_mean and seq_mean_token_sum_norm would weigh each sequence by its length")
    return None


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
    policy_loss: str = "ppo_clip",
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss (a scalar to backpropagate) and detached statistics as python floats.

    `old_logprobs=None` means the learner's policy at the start of the step is these very weights
    (one pass per batch): the ratio is exactly 1 and only its gradient matters. With
    `sampling_logprobs` and `tis_cap > 0` each token's policy loss is weighted by
    `truncated_is_weights(old, sampling_logprobs, tis_cap)`; otherwise by 1. With beta == 0 or no
    reference the KL term is not computed and `kl` is reported as 0.0. `policy_loss` picks the policy
    term (POLICY_LOSSES); the clip and ratio statistics are over its ratios: tokens, or sequences for gspo.
    """
    conflict = policy_loss_conflict(policy_loss, loss_agg)
    if conflict is not None:
        raise ValueError(conflict)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    pg, ratios = _policy_term(policy_loss, logprobs, old, advantages, mask, clip_low, clip_high)
    tis = None
    if sampling_logprobs is not None and tis_cap > 0:
        tis = truncated_is_weights(old, sampling_logprobs, tis_cap)
    per_token = pg if tis is None else tis[0] * pg
    kl = None
    if beta != 0 and ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    loss = aggregate_loss(per_token, mask, loss_agg, max_len)
    stats = _loss_stats(loss, pg, kl, ratios, mask, loss_agg, max_len)
    stats.update(_tis_stats(tis, mask))
    return loss, stats


def _policy_term(policy_loss, logprobs, old, advantages, mask, clip_low, clip_high) -> tuple[Tensor, tuple]:
    """The per-token policy loss, and (ratio, clipped, counted) for the statistics: per token, or per sequence
    for gspo (counted: the sequences with tokens)."""
    m = mask.bool()
    if policy_loss == "gspo":
        pg, clipped, seq_ratio = gspo_surrogate(logprobs, old, advantages, mask, clip_low, clip_high)
        return pg, (seq_ratio, clipped, m.any(dim=1))
    if policy_loss == "cispo":
        pg, clipped = cispo_surrogate(logprobs, old, advantages, clip_low, clip_high)
    else:
        pg, clipped = clipped_surrogate(logprobs, old, advantages, clip_low, clip_high)
    with torch.no_grad():
        ratio = torch.exp((logprobs - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    return pg, (ratio, clipped, m)


@torch.no_grad()
def _tis_stats(tis: Optional[tuple[Tensor, Tensor]], mask: Tensor) -> dict[str, float]:
    if tis is None:
        return {"tis/weight_mean": 1.0, "tis/clipped_fraction": 0.0}
    weights, truncated = tis
    return {"tis/weight_mean": float(masked_mean(weights, mask)),
            "tis/clipped_fraction": float(masked_mean(truncated.float(), mask))}


@torch.no_grad()
def _loss_stats(loss, pg, kl, ratios, mask, loss_agg, max_len) -> dict[str, float]:
    m = mask.bool()
    ratio, clipped, counted = ratios
    has_ratios = bool(counted.any())
    return {
        "loss": float(loss),
        "pg_loss": float(aggregate_loss(pg, m, loss_agg, max_len)),  # before the importance weights
        "kl": float(masked_mean(kl, m)) if kl is not None else 0.0,
        "clip_fraction": float(masked_mean(clipped.float(), counted)),
        # Which bound binds: clip_high (DAPO's clip-higher) above 1, clip_low below. For ppo_clip and gspo
        # this is also the sign of the advantage (only A > 0 clips above, only A < 0 below).
        "clip_fraction_high": float(masked_mean((clipped & (ratio > 1)).float(), counted)),
        "clip_fraction_low": float(masked_mean((clipped & (ratio < 1)).float(), counted)),
        "ratio_mean": float(masked_mean(ratio, counted)),
        "ratio_max": float(ratio[counted].max()) if has_ratios else 0.0,
        "ratio_min": float(ratio[counted].min()) if has_ratios else 0.0,
        "num_tokens": float(m.sum()),
        "num_ratios": float(counted.sum()),  # what the clip and ratio statistics are over
    }
