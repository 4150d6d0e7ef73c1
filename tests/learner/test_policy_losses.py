"""The policy losses of `grpo.policy_loss` (ppo_clip, gspo, cispo), against numbers worked out by hand:
values and gradients on a few tokens, how each composes with loss_agg, truncated importance weights and
the KL term, and the config check."""
import math

import pytest
import torch
from test_grpo import _example, close

from learner.grpo import (
    POLICY_LOSSES,
    aggregate_loss,
    cispo_surrogate,
    clipped_surrogate,
    grpo_loss,
    gspo_surrogate,
    k3_kl,
    token_logprobs,
    truncated_is_weights,
)


def test_ppo_clip_is_the_default_and_unchanged_bit_for_bit():
    """grpo.policy_loss=ppo_clip is the loss as it was: clipped_surrogate, times the importance weights,
    plus beta * k3, aggregated; the same floats, gradient and statistics as leaving the key out."""
    lp, old, ref, adv, mask = _example()
    sampled = torch.log(torch.tensor([[1 / 8, 0.5], [0.4, 1e-9]]))
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        x = lp.clone().requires_grad_()
        pg, _ = clipped_surrogate(x, old, adv, 0.2, 0.28)
        by_hand = aggregate_loss(truncated_is_weights(old, sampled, 2.0)[0] * pg + 0.1 * k3_kl(x, ref), mask, agg)
        (want_grad,) = torch.autograd.grad(by_hand, x)
        results = []
        for extra in ({}, {"policy_loss": "ppo_clip"}):
            y = lp.clone().requires_grad_()
            loss, stats = grpo_loss(y, old, ref, adv, mask, 0.1, 0.2, 0.28, agg, sampling_logprobs=sampled,
                                    tis_cap=2.0, **extra)
            (grad,) = torch.autograd.grad(loss, y)
            assert torch.equal(loss, by_hand.detach()) and torch.equal(grad, want_grad)
            results.append(stats)
        assert results[0] == results[1] and results[0]["num_ratios"] == results[0]["num_tokens"] == 3.0


def _gspo_example():
    """Two sequences, 3 tokens and 2 (+ one padding position), token ratios 4, 0.25, 1.331 | 0.5, 0.98."""
    lp = torch.log(torch.tensor([[0.8, 0.2, 0.6655], [0.3, 0.49, 0.7]]))
    old = torch.log(torch.tensor([[0.2, 0.8, 0.5], [0.6, 0.5, 0.1]]))
    return lp.requires_grad_(), old, torch.tensor([1.0, -2.0]), torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_gspo_hand_computed_value_and_gradient():
    lp, old, adv, mask = _gspo_example()
    # s_0 = (4 * 0.25 * 1.331)^(1/3) = 1.331^(1/3) = 1.1;  s_1 = (0.5 * 0.98)^(1/2) = 0.49^(1/2) = 0.7
    # clip 0.2/0.2, bounds [0.8, 1.2]:
    #   seq 0, A = 1:  min(1.1, 1.1) = 1.1           -> L_0 = -1.1, not clipped
    #   seq 1, A = -2: min(-1.4, 0.8 * -2 = -1.6)    -> L_1 = 1.6, clipped (no gradient)
    # loss (the sequence mean) = (-1.1 + 1.6) / 2 = 0.25
    # d L_0 / d lp_t = -A s_0 d(mean_t lp_t)/d lp_t = -1.1 / 3 per token, / 2 sequences = -0.183333
    loss, stats = grpo_loss(lp, old, None, adv, mask, 0.0, 0.2, 0.2, "seq_mean_token_mean", policy_loss="gspo")
    (grad,) = torch.autograd.grad(loss, lp)
    assert close(loss, 0.25, tol=1e-6)
    assert close(grad, [[-1.1 / 6, -1.1 / 6, -1.1 / 6], [0.0, 0.0, 0.0]], tol=1e-6)
    # statistics over the 2 sequences: one clipped, below 1 (the lower bound)
    assert stats["num_ratios"] == 2.0 and stats["num_tokens"] == 5.0
    assert close(stats["clip_fraction"], 0.5) and close(stats["clip_fraction_low"], 0.5)
    assert stats["clip_fraction_high"] == 0.0
    assert close(stats["ratio_mean"], 0.9, tol=1e-6)  # (1.1 + 0.7) / 2
    assert close(stats["ratio_max"], 1.1, tol=1e-6) and close(stats["ratio_min"], 0.7, tol=1e-6)
    # clip_low 0.4 and clip_high 0.05, bounds [0.6, 1.05]:
    #   seq 0: min(1.1, 1.05) = 1.05                  -> L_0 = -1.05, clipped (no gradient)
    #   seq 1: 0.7 is inside, min(-1.4, -1.4) = -1.4  -> L_1 = 1.4, not clipped
    # loss = (-1.05 + 1.4) / 2 = 0.175;  d L_1 / d lp_t = -A s_1 / 2 tokens = 2 * 0.7 / 2 = 0.7, / 2 sequences = 0.35
    loss, stats = grpo_loss(lp, old, None, adv, mask, 0.0, 0.4, 0.05, "seq_mean_token_mean", policy_loss="gspo")
    (grad,) = torch.autograd.grad(loss, lp)
    assert close(loss, 0.175, tol=1e-6)
    assert close(grad, [[0.0, 0.0, 0.0], [0.35, 0.35, 0.0]], tol=1e-6)
    assert close(stats["clip_fraction_high"], 0.5) and stats["clip_fraction_low"] == 0.0


def test_gspo_token_form_equals_the_sequence_loss():
    """The per-token layout has the value and the gradient of -min(s A, clip(s) A) with s = exp(mean log-ratio)."""
    torch.manual_seed(2)
    lp = (torch.randn(4, 5, dtype=torch.float64) * 0.3 - 1.0).requires_grad_()
    old = lp.detach() + torch.randn(4, 5, dtype=torch.float64) * 0.2
    adv, mask = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64), torch.tensor([[1] * 5, [1] * 3 + [0] * 2,
                                                                                         [1] * 4 + [0], [1] + [0] * 4])
    per_token, clipped, ratio = gspo_surrogate(lp, old, adv, mask, 0.1, 0.1)
    (grad,) = torch.autograd.grad(aggregate_loss(per_token, mask, "seq_mean_token_mean"), lp)
    m = mask.bool()
    x = lp.detach().clone().requires_grad_()
    s = torch.exp(torch.where(m, x - old, 0.0).sum(1) / m.sum(1))
    seq_loss = -torch.minimum(s * adv, s.clamp(0.9, 1.1) * adv).mean()
    (want,) = torch.autograd.grad(seq_loss, x)
    assert torch.allclose(ratio, s.detach(), atol=1e-12, rtol=0) and 0 < int(clipped.sum()) < 4
    assert torch.allclose(aggregate_loss(per_token, mask, "seq_mean_token_mean"), seq_loss, atol=1e-12, rtol=0)
    assert torch.allclose(grad, want, atol=1e-12, rtol=0)


def test_gspo_with_importance_weights_and_kl():
    lp, old, adv, mask = _gspo_example()
    # sampler 0.05, 1.0, 0.5 | 0.4, 0.5: weights min(pi_old / pi_sample, 2) = 2 (of 4), 0.8, 1 | 1.5, 1
    sampled = torch.log(torch.tensor([[0.05, 1.0, 0.5], [0.4, 0.5, 0.3]]))
    # each token's loss L_i is weighted by its own weight: seq 0 -1.1 * (2 + 0.8 + 1) / 3 = -1.393333,
    # seq 1 1.6 * (1.5 + 1) / 2 = 2.0; loss (-1.393333 + 2.0) / 2 = 0.303333
    # token t of seq 0 gets w_t times its unweighted gradient -1.1 / 6: -0.366667, -0.146667, -0.183333
    loss, stats = grpo_loss(lp, old, None, adv, mask, 0.0, 0.2, 0.2, "seq_mean_token_mean", sampling_logprobs=sampled,
                            tis_cap=2.0, policy_loss="gspo")
    (grad,) = torch.autograd.grad(loss, lp)
    assert close(loss, (-1.1 * 3.8 / 3 + 2.0) / 2, tol=1e-6) and close(loss, 0.303333, tol=1e-6)
    assert close(grad, [[-2 * 1.1 / 6, -0.8 * 1.1 / 6, -1.1 / 6], [0.0, 0.0, 0.0]], tol=1e-6)
    assert close(stats["tis/weight_mean"], (2 + 0.8 + 1 + 1.5 + 1) / 5, tol=1e-6)
    # the k3 term is added per token as for ppo_clip, averaged the same way (its own mean per sequence)
    ref = torch.log(torch.tensor([[0.4, 0.2, 0.5], [0.3, 0.98, 0.5]]))
    with_kl, kl_stats = grpo_loss(lp, old, ref, adv, mask, 0.1, 0.2, 0.2, "seq_mean_token_mean",
                                  sampling_logprobs=sampled, tis_cap=2.0, policy_loss="gspo")
    kl_term = aggregate_loss(k3_kl(lp, ref), mask, "seq_mean_token_mean")
    assert close(with_kl, loss.detach() + 0.1 * kl_term.detach(), tol=1e-6) and kl_stats["kl"] > 0


def _cispo_example():
    """Token ratios 1.5, 1, 0.5 | 2, 0.25 (+ padding), advantages 1 and -2."""
    lp = torch.log(torch.tensor([[0.75, 0.5, 0.25], [0.8, 0.1, 0.9]]))
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.4, 0.4, 0.2]]))
    return lp.requires_grad_(), old, torch.tensor([1.0, -2.0]), torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_cispo_hand_computed_value_and_gradient():
    lp, old, adv, mask = _cispo_example()
    # MiniMax-M1's setting: no lower bound (clip_low 1: ratio >= 0), clip_high 0.28. Weights clip(r, 0, 1.28):
    # 1.28, 1, 0.5 | 1.28, 0.25; per token -w * A * lp:
    #   -1.28 ln 0.75 = 0.368233   -1 ln 0.5 = 0.693147   -0.5 ln 0.25 = 0.693147
    #   2 * 1.28 ln 0.8 = -0.571247   2 * 0.25 ln 0.1 = -1.151293
    # token_mean: (0.368233 + 0.693147 + 0.693147 - 0.571247 - 1.151293) / 5 = 0.031987 / 5 = 0.006397
    # gradient -w * A / 5: -0.256, -0.2, -0.1 | 0.512, 0.1 (the clipped tokens keep theirs, scaled by 1.28)
    loss, stats = grpo_loss(lp, old, None, adv, mask, 0.0, 1.0, 0.28, "token_mean", policy_loss="cispo")
    (grad,) = torch.autograd.grad(loss, lp)
    by_hand = (-1.28 * math.log(0.75) - math.log(0.5) - 0.5 * math.log(0.25) + 2.56 * math.log(0.8)
               + 0.5 * math.log(0.1)) / 5
    assert close(by_hand, 0.006397, tol=1e-6) and close(loss, by_hand, tol=1e-6)
    assert close(grad, [[-0.256, -0.2, -0.1], [0.512, 0.1, 0.0]], tol=1e-6)
    assert close(stats["clip_fraction"], 2 / 5) and close(stats["clip_fraction_high"], 2 / 5)
    assert stats["clip_fraction_low"] == 0.0 and stats["num_ratios"] == 5.0
    assert close(stats["ratio_mean"], (1.5 + 1 + 0.5 + 2 + 0.25) / 5, tol=1e-6)
    # ppo_clip on the same tokens drops token 0 (ratio 1.5 > 1.28 with A > 0): no gradient there
    ppo, _ = grpo_loss(lp, old, None, adv, mask, 0.0, 1.0, 0.28, "token_mean")
    assert torch.autograd.grad(ppo, lp)[0][0, 0] == 0.0
    # a lower bound, clip_low 0.2: weights 1.28, 1, 0.8 | 1.28, 0.8; token 2: -0.8 ln 0.25 = 1.109035,
    # seq 1 token 1: 2 * 0.8 ln 0.1 = -3.684136; mean (0.368233 + 0.693147 + 1.109035 - 0.571247 - 3.684136) / 5
    loss, stats = grpo_loss(lp, old, None, adv, mask, 0.0, 0.2, 0.28, "token_mean", policy_loss="cispo")
    (grad,) = torch.autograd.grad(loss, lp)
    assert close(loss, -0.416994, tol=1e-6)
    assert close(grad, [[-0.256, -0.2, -0.16], [0.512, 0.32, 0.0]], tol=1e-6)
    assert close(stats["clip_fraction_low"], 2 / 5) and close(stats["clip_fraction_high"], 2 / 5)


def test_cispo_per_sequence_aggregation_importance_weights_and_kl():
    lp, old, adv, mask = _cispo_example()
    # seq_mean_token_mean: ((0.368233 + 0.693147 + 0.693147) / 3 + (-0.571247 - 1.151293) / 2) / 2 = -0.138214
    # gradient -w * A / (tokens * 2 sequences): -1.28/6, -1/6, -0.5/6 | 2.56/4 = 0.64, 0.5/4 = 0.125
    loss, _ = grpo_loss(lp, old, None, adv, mask, 0.0, 1.0, 0.28, "seq_mean_token_mean", policy_loss="cispo")
    (grad,) = torch.autograd.grad(loss, lp)
    assert close(loss, -0.138214, tol=1e-6)
    assert close(grad, [[-1.28 / 6, -1 / 6, -0.5 / 6], [0.64, 0.125, 0.0]], tol=1e-6)
    # sampler 0.25, 0.5, 0.25 | 0.2, 0.8: weights pi_old / pi_sample = 2, 1, 2 | 2, 0.5 (cap 2): each token's
    # gradient times its weight (both weights are without gradient), the k3 term added unweighted
    sampled = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.8, 0.5]]))
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.2, 0.5]]))
    weighted, stats = grpo_loss(lp, old, ref, adv, mask, 0.1, 1.0, 0.28, "seq_mean_token_mean",
                                sampling_logprobs=sampled, tis_cap=2.0, policy_loss="cispo")
    (wgrad,) = torch.autograd.grad(weighted, lp)
    x = lp.detach().clone().requires_grad_()
    (kl_grad,) = torch.autograd.grad(0.1 * aggregate_loss(k3_kl(x, ref), mask, "seq_mean_token_mean"), x)
    assert close(wgrad - kl_grad, torch.tensor([[2.0, 1.0, 2.0], [2.0, 0.5, 0.0]]) * grad, tol=1e-6)
    assert close(stats["tis/weight_mean"], 7.5 / 5, tol=1e-6) and stats["kl"] > 0


def test_cispo_weight_carries_no_gradient():
    lp, old, adv, _ = _cispo_example()
    per_token, clipped = cispo_surrogate(lp, old, adv, 1.0, 0.28)
    (grad,) = torch.autograd.grad(per_token.sum(), lp)
    # d(-w A lp)/d lp = -w A with w held: 1.28, 1, 0.5 | -2 * 1.28, -2 * 0.25, and the padding's 0.9 / 0.2 = 4.5 -> 1.28
    assert close(grad, [[-1.28, -1.0, -0.5], [2.56, 0.5, 2.56]], tol=1e-6)
    assert clipped.tolist() == [[True, False, False], [True, False, True]]


@pytest.mark.parametrize("policy_loss,modes", [("gspo", ["seq_mean_token_mean"]),
                                               ("cispo", ["token_mean", "seq_mean_token_mean",
                                                          "seq_mean_token_sum_norm"])])
def test_on_policy_gradient_equals_ppo_clip(policy_loss, modes):
    """At ratio 1 (one pass per batch) all three are the plain policy gradient: the same gradient as ppo_clip."""
    torch.manual_seed(4)
    logits = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    tokens, mask = torch.randint(0, 7, (3, 4)), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    ref = torch.log_softmax(torch.randn(3, 4, 7, dtype=torch.float64), -1)[..., 0]
    for mode in modes:
        grads = []
        for name in ("ppo_clip", policy_loss):
            loss, stats = grpo_loss(token_logprobs(logits, tokens), None, ref, adv, mask, 0.04, 0.2, 0.2, mode,
                                    policy_loss=name)
            grads.append(torch.autograd.grad(loss, logits)[0])
            assert stats["ratio_mean"] == 1.0 and stats["clip_fraction"] == 0.0
        assert torch.allclose(grads[0], grads[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("policy_loss", ["gspo", "cispo"])
def test_padding_changes_nothing_in_the_new_losses(policy_loss):
    lp, old, adv, mask = _gspo_example()
    pad = ~mask.bool()
    base, base_stats = grpo_loss(lp, old, None, adv, mask, 0.0, 0.2, 0.2, "seq_mean_token_mean",
                                 policy_loss=policy_loss)
    (base_grad,) = torch.autograd.grad(base, lp)
    lp2 = torch.where(pad, torch.tensor(-1e4), lp.detach()).requires_grad_()
    noisy, noisy_stats = grpo_loss(lp2, torch.where(pad, 1e4, old), None, adv, mask, 0.0, 0.2, 0.2,
                                   "seq_mean_token_mean", policy_loss=policy_loss)
    (noisy_grad,) = torch.autograd.grad(noisy, lp2)
    assert torch.equal(noisy, base) and noisy_stats == base_stats
    assert torch.equal(noisy_grad, base_grad) and noisy_grad[1, 2] == 0.0


def test_gspo_sequence_without_tokens_counts_nowhere():
    lp, old, adv, _ = _gspo_example()
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    loss, stats = grpo_loss(lp, old, None, adv, mask, 0.0, 0.2, 0.2, "seq_mean_token_mean", policy_loss="gspo")
    assert close(loss, -1.1 / 2, tol=1e-6)  # seq 0's -1.1, and 0 for the empty one, over 2 sequences
    assert stats["num_ratios"] == 1.0 and close(stats["ratio_mean"], 1.1, tol=1e-6)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum_norm"])
def test_gspo_refuses_length_weighted_aggregations(mode):
    lp, old, adv, mask = _gspo_example()
    with pytest.raises(ValueError, match=f"grpo.loss_agg=seq_mean_token_mean, got '{mode}'"):
        grpo_loss(lp, old, None, adv, mask, 0.0, 0.2, 0.2, mode, policy_loss="gspo")


def test_unknown_policy_loss_is_named():
    lp, old, adv, mask = _gspo_example()
    with pytest.raises(ValueError, match="'ppo'.*ppo_clip, gspo, cispo"):
        grpo_loss(lp, old, None, adv, mask, 0.0, 0.2, 0.2, "token_mean", policy_loss="ppo")


def test_config_validates_policy_loss():
    from launcher.config import ConfigError, load_config

    assert load_config(None, []).grpo.policy_loss == "ppo_clip"
    assert load_config(None, ["grpo.policy_loss=gspo", "grpo.clip_low=3e-4", "grpo.clip_high=4e-4"]).grpo.clip_low == 3e-4
    assert load_config(None, ["grpo.policy_loss=cispo", "grpo.loss_agg=token_mean", "grpo.clip_low=1"])
    with pytest.raises(ConfigError, match="'grpo.policy_loss'") as err:
        load_config(None, ["grpo.policy_loss=ppo"])
    assert all(name in str(err.value) for name in POLICY_LOSSES)
    with pytest.raises(ConfigError, match=r"'grpo.policy_loss'.*grpo.loss_agg=seq_mean_token_mean, got 'token_mean'"):
        load_config(None, ["grpo.policy_loss=gspo", "grpo.loss_agg=token_mean"])
