# Run: pytest tests/assignments/test_am3safety.py -q     (seconds; docs/assignments/am3safety.md)
"""Grader of the AM3Safety assignment: the turn-aware reward, Eqs. 6-9, on values worked out by
hand: Var_t over the N rollouts (1/N), U_t = Var_t + lambda * max(0, tau - mean_t s), alpha =
softmax(U), r_i = sum_t alpha_t (beta h_it + s_it)."""
import math

import pytest
import torch

from am3safety import turn_aware_reward

S = torch.tensor([[1.0, 0.0], [1.0, 1.0]])     # (N=2 rollouts, T=2 turns) safety
H = torch.tensor([[0.5, 0.2], [0.0, 1.0]])     # helpfulness


def test_turn_aware_reward_by_hand():
    r, alpha, U = turn_aware_reward(H, S, lam=1.0, tau=0.8, beta=0.5)
    # turn 1: mean 1, Var 0, hinge max(0, 0.8 - 1) = 0 -> U 0
    # turn 2: mean 0.5, Var (0.25 + 0.25) / 2 = 0.25 (1/N, not 1/(N-1)), hinge 0.3 -> U 0.55
    assert U.tolist() == pytest.approx([0.0, 0.55])
    a2 = math.exp(0.55) / (1 + math.exp(0.55))
    assert alpha.tolist() == pytest.approx([1 - a2, a2])
    # r_i = sum_t alpha_t (0.5 h + s): rollout 1 [1.25, 0.1], rollout 2 [1.0, 1.5]
    assert r.tolist() == pytest.approx([(1 - a2) * 1.25 + a2 * 0.1, (1 - a2) * 1.0 + a2 * 1.5])


def test_turn_aware_reward_uniform_ablation():
    r, alpha, U = turn_aware_reward(H, S, lam=1.0, tau=0.8, beta=0.5, uniform=True)
    assert alpha.tolist() == pytest.approx([0.5, 0.5])
    assert U.tolist() == pytest.approx([0.0, 0.55])             # U is still reported
    assert r.tolist() == pytest.approx([(1.25 + 0.1) / 2, (1.0 + 1.5) / 2])


def test_turn_aware_reward_always_unsafe_turn_gets_weight():
    # turn 2 is unsafe in every rollout: Var 0, so only the hinge (Eq. 7) gives it weight
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    h = torch.zeros(4, 2)
    _, alpha0, U0 = turn_aware_reward(h, s, lam=0.0, tau=0.8, beta=1.0)
    _, alpha1, U1 = turn_aware_reward(h, s, lam=2.0, tau=0.8, beta=1.0)
    # turn 1: mean 0.5, Var 0.25, hinge 0.3; turn 2: mean 0, Var 0, hinge 0.8
    assert U0.tolist() == pytest.approx([0.25, 0.0])
    assert U1.tolist() == pytest.approx([0.25 + 0.6, 1.6])
    assert alpha0[1] < alpha0[0] and alpha1[1] > alpha1[0]


def test_turn_aware_reward_shapes_and_normalisation():
    torch.manual_seed(0)
    s, h = torch.rand(5, 3), torch.rand(5, 3)
    r, alpha, U = turn_aware_reward(h, s, lam=0.5, tau=0.7, beta=0.2)
    assert r.shape == (5,) and alpha.shape == (3,) and U.shape == (3,)
    assert alpha.sum().item() == pytest.approx(1.0)
    # a softmax: alpha_t / alpha_u = exp(U_t - U_u)
    assert (alpha[0] / alpha[2]).item() == pytest.approx(math.exp((U[0] - U[2]).item()), rel=1e-5)
    assert torch.allclose(r, ((0.2 * h + s) * alpha).sum(1))
