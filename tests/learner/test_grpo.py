"""The GRPO objective, function by function, against numbers worked out by hand."""
import math

import pytest
import torch

from learner.grpo import (
    aggregate_loss,
    clipped_surrogate,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    k3_kl,
    token_logprobs,
    truncated_is_weights,
)

EPS = 1e-4


def close(actual, expected, tol=1e-6):
    actual = torch.as_tensor(actual).detach().double()
    return torch.allclose(actual, torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0)


# ---------------------------------------------------------------- group_advantages
def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 2.0, 1.0])
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.577350; +-0.5 / 0.577450 = +-0.865876
    # group 2: mean 1, deviations -1 0 1 0, unbiased std sqrt(2 / 3) = 0.816497; +-1 / 0.816597 = +-1.224594
    a1, a2 = 0.5 / (math.sqrt(1 / 3) + EPS), 1.0 / (math.sqrt(2 / 3) + EPS)
    assert abs(a1 - 0.865876) < 1e-6 and abs(a2 - 1.224594) < 1e-6
    adv = group_advantages(rewards, group_size=4)
    assert close(adv, [a1, -a1, a1, -a1, -a2, 0.0, a2, 0.0])


def test_group_advantages_without_std_is_dr_grpo():
    adv = group_advantages(torch.tensor([2.0, 0.0, 1.0, 3.0, 3.0, 0.0]), group_size=3, normalize_std=False)
    # means 1 and 2: [2-1, 0-1, 1-1, 3-2, 3-2, 0-2]
    assert close(adv, [1.0, -1.0, 0.0, 1.0, 1.0, -2.0])


def test_all_equal_group_is_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point: an all-equal group must still give exactly 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 2.0, 2.0, 2.0, 0.0, 1.0, 2.0])
    adv = group_advantages(rewards, group_size=3)
    assert torch.equal(adv[:6], torch.zeros(6))
    assert close(adv[6:], [-1 / (1 + EPS), 0.0, 1 / (1 + EPS)])  # mean 1, std sqrt(2/2) = 1
    assert not torch.isnan(adv).any()
    assert torch.equal(group_advantages(torch.tensor([0.7, 0.7]), 2, normalize_std=False), torch.zeros(2))


def test_group_of_one_is_zero_not_nan():
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0, 3.0]), group_size=1), torch.zeros(3))


def test_integer_rewards_and_bad_shapes():
    assert close(group_advantages(torch.tensor([1, 3]), 2, normalize_std=False), [-1.0, 1.0])
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 4), group_size=4)


# ---------------------------------------------------------------- token_logprobs, entropy
def test_token_logprobs_hand_computed():
    # logits ln1, ln2, ln5: softmax = 1/8, 2/8, 5/8
    row = torch.log(torch.tensor([1.0, 2.0, 5.0]))
    logits = torch.stack([row, row.flip(0)]).unsqueeze(0)  # [1, 2, 3]; second position: 5/8, 2/8, 1/8
    tokens = torch.tensor([[2, 2]])
    assert close(token_logprobs(logits, tokens), [[math.log(5 / 8), math.log(1 / 8)]])
    # temperature 2 halves the logits: weights 1, sqrt2, sqrt5
    z = 1 + math.sqrt(2) + math.sqrt(5)
    assert close(token_logprobs(logits, tokens, temperature=2.0), [[math.log(math.sqrt(5) / z), math.log(1 / z)]])


def test_token_logprobs_matches_log_softmax_and_bf16():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    tokens = torch.randint(0, 11, (3, 5))
    ref = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tokens, temperature=0.7), ref, atol=1e-5)
    low = token_logprobs(logits.bfloat16(), tokens)
    assert low.dtype == torch.float32
    assert torch.allclose(low, torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, tokens.unsqueeze(-1))
                          .squeeze(-1), atol=1e-5)
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens, temperature=0.0)


def test_entropy_hand_computed():
    row = torch.log(torch.tensor([1.0, 2.0, 5.0]))
    logits = torch.stack([row, torch.zeros(3)]).unsqueeze(0)
    h = -(1 / 8 * math.log(1 / 8) + 2 / 8 * math.log(2 / 8) + 5 / 8 * math.log(5 / 8))  # 0.900256
    assert abs(h - 0.900256) < 1e-6
    assert close(entropy_from_logits(logits), [[h, math.log(3)]])  # uniform over 3: ln 3
    # a shift of all logits changes nothing; temperature 0.5 doubles ln-weights: 1, 4, 25 out of 30
    h_cold = -sum(p * math.log(p) for p in (1 / 30, 4 / 30, 25 / 30))
    assert close(entropy_from_logits(logits[:, :1] + 100.0, temperature=0.5), [[h_cold]], tol=1e-5)


def test_entropy_in_slices_equals_the_whole_rows_entropy():
    """Rows longer than ENTROPY_SLICE are done a slice at a time (bounded temporaries at a 151k vocabulary)."""
    from learner.grpo import ENTROPY_SLICE

    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(2, 2 * ENTROPY_SLICE + 5, 50, generator=g, dtype=torch.float64)
    p = torch.softmax(logits / 0.7, dim=-1)
    whole = -(p * torch.log(p)).sum(dim=-1)
    assert torch.allclose(entropy_from_logits(logits, temperature=0.7), whole, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- clipped_surrogate, k3
def test_clipped_surrogate_hand_computed():
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.25, 1.0]])
    old = torch.zeros_like(ratios)
    lp = torch.log(ratios)
    # one sequence per column so each token gets its own advantage
    lp, old = lp.T, old.T  # [6, 1]
    adv = torch.tensor([2.0, -2.0, 1.0, -1.0, 1.0, -3.0])
    loss, clipped = clipped_surrogate(lp, old, adv, clip_low=0.2, clip_high=0.28)
    # ratio 1.5, A 2:  min(3.0, 1.28*2 = 2.56) = 2.56  -> loss -2.56, clipped
    # ratio 1.5, A -2: min(-3.0, -2.56) = -3.0          -> loss  3.0, not clipped
    # ratio 0.5, A 1:  min(0.5, 0.8) = 0.5              -> loss -0.5, not clipped
    # ratio 0.5, A -1: min(-0.5, -0.8) = -0.8           -> loss  0.8, clipped
    # ratio 1.25, A 1: inside [0.8, 1.28]: 1.25         -> loss -1.25, not clipped
    # ratio 1, A -3:   -3                               -> loss  3.0, not clipped
    assert close(loss.squeeze(1), [-2.56, 3.0, -0.5, 0.8, -1.25, 3.0], tol=1e-5)
    assert clipped.squeeze(1).tolist() == [True, False, False, True, False, False]


def test_clipped_tokens_give_no_gradient():
    lp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    loss, clipped = clipped_surrogate(lp, torch.zeros(1, 2), torch.tensor([1.0]), 0.2, 0.2)
    loss.sum().backward()
    # token 0 is clipped (1.5 > 1.2): no gradient; token 1: d(-ratio)/d lp = -ratio = -1.1
    assert clipped.tolist() == [[True, False]]
    assert close(lp.grad, [[0.0, -1.1]], tol=1e-6)


def test_k3_kl_hand_computed():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.3]]))
    # d = ln(0.25/0.5) = -ln2: 0.5 + ln2 - 1 = 0.193147;  d = ln2: 2 - ln2 - 1 = 0.306853;  d = 0: 0
    assert close(k3_kl(lp, ref), [[0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0]])
    assert close(k3_kl(lp, ref), [[0.193147, 0.306853, 0.0]])


# ---------------------------------------------------------------- aggregate_loss
LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize(
    "mode,max_len,expected",
    [
        ("token_mean", None, 17 / 5),  # (1+2+3 + 5+6) / 5 tokens = 3.4
        ("seq_mean_token_mean", None, (6 / 3 + 11 / 2) / 2),  # (2 + 5.5) / 2 = 3.75
        ("seq_mean_token_sum_norm", None, 17 / (2 * 4)),  # 2.125
        ("seq_mean_token_sum_norm", 10, 17 / (2 * 10)),  # 0.85
    ],
)
def test_aggregate_loss_hand_computed(mode, max_len, expected):
    assert close(aggregate_loss(LOSS, MASK, mode, max_len), expected)
    assert close(aggregate_loss(LOSS, MASK.bool(), mode, max_len), expected)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_padding_values_change_nothing_in_aggregation(mode):
    garbage = torch.where(MASK.bool(), LOSS, torch.tensor(float("inf")))
    assert close(aggregate_loss(garbage, MASK, mode), aggregate_loss(LOSS, MASK, mode))


def test_unknown_aggregation_is_named():
    with pytest.raises(ValueError, match="'seq_mean'"):
        aggregate_loss(LOSS, MASK, "seq_mean")


def test_sequence_without_tokens_counts_as_zero():
    assert close(aggregate_loss(LOSS, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), "seq_mean_token_mean"), 1.5 / 2)


# ---------------------------------------------------------------- grpo_loss
def _example():
    """Two sequences; the second has one padding position (its values are arbitrary)."""
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.3, 0.9]]))
    old = torch.log(torch.tensor([[0.5 / 1.5, 0.25], [0.6, 0.1]]))  # ratios 1.5, 1.0 | 0.5
    ref = torch.log(torch.tensor([[0.25, 0.25], [0.6, 0.2]]))  # k3: 0.193147, 0 | 0.306853
    return lp, old, ref, torch.tensor([1.0, -1.0]), torch.tensor([[1, 1], [1, 0]])


def test_grpo_loss_hand_computed():
    lp, old, ref, adv, mask = _example()
    # pg per token (clip 0.2): min(1.5, 1.2) -> -1.2 (clipped, A > 0); -1.0 | min(-0.5, -0.8) -> 0.8 (clipped, A < 0)
    # k3 sums to (0.5 + ln2 - 1) + (2 - ln2 - 1) = 0.5, so with beta 0.1 the KL adds 0.05 in all
    loss, stats = grpo_loss(lp, old, ref, adv, mask, beta=0.1, clip_low=0.2, clip_high=0.2, loss_agg="token_mean")
    assert close(loss, (-1.2 - 1.0 + 0.8 + 0.05) / 3, tol=1e-6)  # -0.45
    assert close(stats["loss"], -0.45, tol=1e-6)
    assert close(stats["pg_loss"], -1.4 / 3, tol=1e-6)
    assert close(stats["kl"], 0.5 / 3, tol=1e-6)
    assert close(stats["clip_fraction"], 2 / 3) and close(stats["clip_fraction_high"], 1 / 3)
    assert close(stats["clip_fraction_low"], 1 / 3)
    assert close(stats["ratio_mean"], (1.5 + 1.0 + 0.5) / 3, tol=1e-6)
    assert close(stats["ratio_max"], 1.5, tol=1e-6) and close(stats["ratio_min"], 0.5, tol=1e-6)
    assert stats["num_tokens"] == 3.0
    assert all(isinstance(v, float) for v in stats.values())
    # the paper's aggregation: row 0 (-1.2 + 0.0193147 - 1.0) / 2 = -1.0903427, row 1 0.8 + 0.0306853; mean
    seq, _ = grpo_loss(lp, old, ref, adv, mask, 0.1, 0.2, 0.2, "seq_mean_token_mean")
    assert close(seq, ((-2.2 + 0.1 * (0.5 + math.log(2) - 1)) / 2 + 0.8 + 0.1 * (1 - math.log(2))) / 2, tol=1e-6)
    assert close(seq, -0.1298287, tol=1e-6)


def test_grpo_loss_skips_kl_without_beta_or_reference():
    lp, old, ref, adv, mask = _example()
    for beta, reference in ((0.0, ref), (0.1, None)):
        loss, stats = grpo_loss(lp, old, reference, adv, mask, beta, 0.2, 0.2, "token_mean")
        assert close(loss, -1.4 / 3, tol=1e-6) and stats["kl"] == 0.0


def test_grpo_loss_clip_higher():
    lp, old, ref, adv, mask = _example()
    # clip_high 0.6: ratio 1.5 is no longer clipped, so token 0 gives -1.5: (-1.5 - 1.0 + 0.8) / 3
    loss, stats = grpo_loss(lp, old, None, adv, mask, 0.0, 0.2, 0.6, "token_mean")
    assert close(loss, -1.7 / 3, tol=1e-6)
    assert close(stats["clip_fraction_high"], 0.0) and close(stats["clip_fraction_low"], 1 / 3)


def test_padding_changes_nothing_in_grpo_loss():
    lp, old, ref, adv, mask = _example()
    pad = ~mask.bool()
    lp = lp.clone().requires_grad_()
    base, base_stats = grpo_loss(lp, old, ref, adv, mask, 0.1, 0.2, 0.2, "seq_mean_token_mean")
    (base_grad,) = torch.autograd.grad(base, lp)
    lp2 = torch.where(pad, torch.tensor(-1e4), lp.detach()).requires_grad_()
    noisy, noisy_stats = grpo_loss(lp2, torch.where(pad, 1e4, old), torch.where(pad, 3e4, ref), adv, mask, 0.1, 0.2,
                                   0.2, "seq_mean_token_mean")
    (noisy_grad,) = torch.autograd.grad(noisy, lp2)
    assert torch.equal(noisy, base) and noisy_stats == base_stats
    assert torch.equal(noisy_grad, base_grad) and noisy_grad[1, 1] == 0.0


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_gradient_is_the_policy_gradient_at_ratio_one(mode):
    torch.manual_seed(1)
    B, T, V = 3, 4, 7
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    lp = token_logprobs(logits, tokens)
    assert lp.dtype == torch.float64
    loss, stats = grpo_loss(lp, lp.detach(), None, adv, mask, 0.0, 0.2, 0.2, mode)
    (grad,) = torch.autograd.grad(loss, logits)
    assert stats["ratio_mean"] == 1.0 and stats["clip_fraction"] == 0.0

    m = mask.double()
    weights = {
        "token_mean": m / m.sum(),  # every token 1/7
        "seq_mean_token_mean": m / (B * m.sum(dim=1, keepdim=True)),  # 1/12, 1/6, 1/3 per token
        "seq_mean_token_sum_norm": m / (B * T),  # every token 1/12
    }[mode]
    # independently: -sum_t w_t A grad log pi(token_t), by autograd on log_softmax
    logits2 = logits.detach().clone().requires_grad_()
    log_pi = torch.log_softmax(logits2, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (expected,) = torch.autograd.grad(-(weights * adv[:, None] * log_pi).sum(), logits2)
    assert torch.allclose(grad, expected, atol=1e-12, rtol=0)
    # and in closed form: grad log softmax(z)[k] = onehot(k) - softmax(z)
    onehot = torch.nn.functional.one_hot(tokens, V).double()
    closed = -(weights * adv[:, None])[..., None] * (onehot - torch.softmax(logits.detach(), -1))
    assert torch.allclose(grad, closed, atol=1e-12, rtol=0)
    assert torch.equal(grad[2, 1:], torch.zeros(T - 1, V, dtype=torch.float64))  # padding: no gradient


# ---------------------------------------------------------------- truncated importance sampling
def test_truncated_is_weights_hand_computed():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9, 0.3]]))
    sampled = torch.log(torch.tensor([[0.5, 0.4, 0.3, 0.05]]))
    # ratios pi_old / pi_sample: 1, 0.5, 3, 6 -> cap 2: 1, 0.5, 2, 2 (the last two truncated)
    weights, truncated = truncated_is_weights(old, sampled, cap=2.0)
    assert close(weights, [[1.0, 0.5, 2.0, 2.0]], tol=1e-6)
    assert truncated.tolist() == [[False, False, True, True]]
    weights, truncated = truncated_is_weights(old, sampled, cap=4.0)
    assert close(weights, [[1.0, 0.5, 3.0, 4.0]], tol=1e-6) and truncated.tolist() == [[False, False, False, True]]
    with pytest.raises(ValueError, match="cap must be positive"):
        truncated_is_weights(old, sampled, cap=0.0)


def test_truncated_is_weights_carry_no_gradient():
    old = torch.log(torch.tensor([[0.6, 0.2]])).requires_grad_()
    weights, _ = truncated_is_weights(old, torch.log(torch.tensor([[0.3, 0.4]])), 2.0)
    assert not weights.requires_grad


def test_grpo_loss_with_importance_weights_hand_computed():
    lp, old, ref, adv, mask = _example()
    # policy at the step's start: 1/3, 0.25 | 0.6; sampler: 1/8, 0.5 | 0.4 (padding: anything)
    sampled = torch.log(torch.tensor([[1 / 8, 0.5], [0.4, 1e-9]]))
    # weights min(pi_old / pi_sample, 2): 8/3 truncated to 2, 0.5 | 1.5
    # pg per token as in test_grpo_loss_hand_computed: -1.2, -1.0 | 0.8
    loss, stats = grpo_loss(lp, old, None, adv, mask, 0.0, 0.2, 0.2, "token_mean", sampling_logprobs=sampled,
                            tis_cap=2.0)
    assert close(loss, (2 * -1.2 + 0.5 * -1.0 + 1.5 * 0.8) / 3, tol=1e-6)  # -0.5667
    assert close(stats["tis/weight_mean"], (2 + 0.5 + 1.5) / 3, tol=1e-6)
    assert close(stats["tis/clipped_fraction"], 1 / 3)
    assert close(stats["pg_loss"], -1.4 / 3, tol=1e-6)  # reported before the weights
    # the KL term is not weighted: beta 0.1 adds 0.1 * 0.5 / 3 as before
    with_kl, _ = grpo_loss(lp, old, ref, adv, mask, 0.1, 0.2, 0.2, "token_mean", sampling_logprobs=sampled,
                           tis_cap=2.0)
    assert close(with_kl, (2 * -1.2 + 0.5 * -1.0 + 1.5 * 0.8 + 0.05) / 3, tol=1e-6)
    # cap 0 leaves the weights out
    off, off_stats = grpo_loss(lp, old, None, adv, mask, 0.0, 0.2, 0.2, "token_mean", sampling_logprobs=sampled,
                               tis_cap=0.0)
    assert close(off, -1.4 / 3, tol=1e-6) and off_stats["tis/weight_mean"] == 1.0


def test_importance_weights_scale_the_policy_gradient():
    """On-policy (old = these weights), the gradient of token t is w_t times the plain policy gradient."""
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.8]])).requires_grad_()
    sampled = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))  # weights 2, 0.5, 8 -> capped at 2
    adv, mask = torch.tensor([1.5]), torch.ones(1, 3)
    loss, stats = grpo_loss(lp, None, None, adv, mask, 0.0, 0.2, 0.2, "token_mean", sampling_logprobs=sampled,
                            tis_cap=2.0)
    (grad,) = torch.autograd.grad(loss, lp)
    # d(-ratio * A / 3) / d lp at ratio 1 = -A / 3 = -0.5 per token, times its weight
    assert close(grad, [[-0.5 * 2, -0.5 * 0.5, -0.5 * 2]], tol=1e-6)
    assert close(stats["tis/clipped_fraction"], 1 / 3)


def test_matching_sampler_leaves_the_loss_unchanged():
    """Engine and learner agreeing to float32 rounding (what max_staleness=0 gives): weights are 1 to
    within 1e-6 and the loss moves by less than that."""
    torch.manual_seed(3)
    lp = torch.log_softmax(torch.randn(4, 6, 9), -1)[..., 0]
    sampled = lp + torch.randn_like(lp) * 1e-7
    adv, mask = torch.tensor([1.0, -0.5, 0.3, -2.0]), torch.ones(4, 6)
    plain, _ = grpo_loss(lp, None, None, adv, mask, 0.0, 0.2, 0.2, "seq_mean_token_mean")
    weighted, stats = grpo_loss(lp, None, None, adv, mask, 0.0, 0.2, 0.2, "seq_mean_token_mean",
                                sampling_logprobs=sampled, tis_cap=2.0)
    assert abs(stats["tis/weight_mean"] - 1.0) < 1e-6 and stats["tis/clipped_fraction"] == 0.0
    assert abs(float(weighted - plain)) < 1e-6 * float(plain.abs()) + 1e-9
