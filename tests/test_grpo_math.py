# Run: pytest tests/test_grpo_math.py -q
"""GRPO math against hand-computed values: advantages, every loss type, clipping, KL, gradients."""
import math

import pytest
import torch

from common.grpo import group_advantages, grpo_loss, sample_prompts


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.5, unbiased std = sqrt((4 * 0.25) / 3) = 0.57735; group 2: all tie -> 0
    s = math.sqrt(1 / 3)
    exp = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0]
    assert group_advantages(r, 4, "group").tolist() == pytest.approx(exp, rel=1e-6)
    assert group_advantages(r, 4,
                            "none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # batch std of all 8 rewards: mean 1.25; squares of deviations sum = 2*(0.0625) + 2*(1.5625) +
    # 4*(0.5625) = 5.5
    sb = math.sqrt(5.5 / 7)
    assert group_advantages(r, 4, "batch").tolist() == pytest.approx(
        [0.5 / (sb + 1e-4), -0.5 / (sb + 1e-4), -0.5 / (sb + 1e-4), 0.5 / (sb + 1e-4), 0, 0, 0, 0],
        rel=1e-6)
    with pytest.raises(ValueError):
        group_advantages(r, 4, "bogus")


def _case():
    # 2 sequences x 3 tokens; sequence 0 has 3 tokens, sequence 1 has 2 (last is padding)
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 1.0]]))  # ratios (old = 0)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, adv, mask


def test_clipped_surrogate_both_sides_by_hand():
    logp, old, adv, mask = _case()
    # eps 0.2: seq 0 (A = +1): ratios 1, 1.5, 0.5 -> min(r A, clip(r) A) = 1, 1.2, 0.5
    #          seq 1 (A = -2): ratios 1.1, 0.7    -> min(-2.2, -2.2) = -2.2, min(-1.4, -1.6) = -1.6
    per_tok = [[-1.0, -1.2, -0.5], [2.2, 1.6, 0.0]]
    loss, st = grpo_loss(logp, old, None, adv, mask, loss_type="grpo", epsilon=0.2)
    assert loss.item() == pytest.approx(((-1.0 - 1.2 - 0.5) / 3 + (2.2 + 1.6) / 2) / 2, rel=1e-6)
    # clip fractions: high clip counts only when A > 0 and r > 1.2 (token 0,1); low when A < 0 and r
    # < 0.8 (token 1,1)
    assert st["clip_ratio/high_mean"] == pytest.approx(1 / 5)
    assert st["clip_ratio/low_mean"] == pytest.approx(1 / 5)
    assert st["clip_ratio/region_mean"] == pytest.approx(2 / 5)
    tot = sum(v for row, mrow in zip(per_tok, mask.tolist()) for v, m in zip(row, mrow) if m)
    assert grpo_loss(logp, old, None, adv, mask,
                     loss_type="bnpo")[0].item() == pytest.approx(tot / 5, rel=1e-6)
    assert grpo_loss(logp, old, None, adv, mask,
                     loss_type="dapo")[0].item() == pytest.approx(tot / 5, rel=1e-6)
    assert grpo_loss(logp, old, None, adv, mask, loss_type="dapo",
                     num_items_in_batch=10)[0].item() == pytest.approx(tot / 10, rel=1e-6)
    assert grpo_loss(logp, old, None, adv, mask, loss_type="dr_grpo",
                     max_completion_length=4)[0].item() == pytest.approx(tot / (2 * 4), rel=1e-6)
    # clip-higher (DAPO): eps_high 0.6 lets ratio 1.5 through for A > 0
    loss_hi, _ = grpo_loss(logp, old, None, adv, mask, loss_type="bnpo", epsilon=0.2,
                           epsilon_high=0.6)
    assert loss_hi.item() == pytest.approx((tot - 0.3) / 5, rel=1e-6)
    with pytest.raises(ValueError):
        grpo_loss(logp, old, None, adv, mask, loss_type="dr_grpo")


def test_k3_kl_term_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    mask = torch.ones(1, 2)
    adv = torch.zeros(1)  # surrogate vanishes, only beta * kl remains
    # token 0: d = ln(0.25/0.5) = -ln 2; kl = 0.5 + ln 2 - 1 = 0.193147; token 1: d = 0 -> 0
    kl0 = 0.5 + math.log(2) - 1
    loss, st = grpo_loss(logp, logp.detach(), ref, adv, mask, loss_type="grpo", beta=0.1)
    assert st["kl"] == pytest.approx(kl0 / 2, rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * kl0 / 2, rel=1e-6)


def test_gradient_on_policy():
    # mu = 1: old = logp.detach() so ratio = 1, and d loss / d logp_t = -A_b * mask / n_b / B (grpo)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -0.9]], requires_grad=True)
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask, loss_type="grpo")
    loss.backward()
    exp = torch.tensor([[-1.5 / 3 / 2] * 3, [0.5 / 2 / 2, 0.5 / 2 / 2, 0.0]])
    assert torch.allclose(logp.grad, exp, atol=1e-7)
    # KL gradient: d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    lp = torch.tensor([[-1.0]], requires_grad=True)
    ref = torch.tensor([[-2.0]])
    loss, _ = grpo_loss(lp, lp.detach(), ref, torch.zeros(1), torch.ones(1, 1), beta=1.0)
    loss.backward()
    assert lp.grad.item() == pytest.approx(1 - math.exp(-1.0), rel=1e-6)


def test_clipped_tokens_have_no_gradient():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_(True)
    loss, _ = grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), loss_type="bnpo")
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0                     # clipped above: no gradient
    assert logp.grad[0, 1].item() == pytest.approx(-1.1 / 2)  # d(-r A)/dlogp = -r A / n


def test_prompt_order_is_a_function_of_seed_and_step():
    a = [sample_prompts(10, 3, s, seed=1) for s in range(8)]
    b = [sample_prompts(10, 3, s, seed=1) for s in range(8)]
    assert a == b
    flat = [i for s in a[:3] for i in s] + a[3][:1]   # the first 10 draws are one permutation
    assert sorted(flat) == list(range(10))
    w = sample_prompts(4, 1000, 0, seed=0, weights=[0, 0, 1, 3])
    assert set(w) <= {2, 3} and 0.65 < w.count(3) / 1000 < 0.85


def test_gspo_sequence_level_ratio_by_hand():
    """importance_sampling_level="sequence" (GSPO, TRL's semantics): one ratio per sequence,
    s_i = exp(mean_t (logp - old)) over its masked tokens, clipped like the token ratio.
    Row 0: mean(0.1, 0.3) = 0.2 -> s = 1.2214 > 1.2, A = +1: clipped at 1.2, no gradient.
    Row 1: mean(-0.5, -0.1, 0.0) = -0.2 -> s = 0.8187 (inside), A = -1: loss term +s.
    grpo: mean over rows of the per-token loss = (-1.2 + 0.8187) / 2 = -0.19063;
    d loss / d logp[1, t] = 1/2 * s / 3 = 0.13645 for each of row 1's tokens."""
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.3, 9.0], [-0.5, -0.1, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, st = grpo_loss(logp, old, None, torch.tensor([1.0, -1.0]), mask, epsilon=0.2,
                         importance_sampling_level="sequence")
    s1 = math.exp(-0.2)
    assert loss.item() == pytest.approx((-1.2 + s1) / 2, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [s1 / 6] * 3]), atol=1e-6)
    assert st["clip_ratio/high_mean"] == 0.5 and st["clip_ratio/low_mean"] == 0.0   # per sequence
    tok, _ = grpo_loss(logp.detach(), old, None, torch.tensor([1.0, -1.0]), mask, epsilon=0.2)
    # differs from token level
    assert abs(tok.item() - loss.item()) > 1e-3
