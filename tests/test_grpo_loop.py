# Run: OMP_NUM_THREADS=1 pytest tests/test_grpo_loop.py -q
"""train_grpo itself, against hand computations: the loss, KL, gradient norm and micro-batch
weighting it logs and back-propagates; the reference, mask, temperature and normaliser each
change these numbers, so a wrong one fails here. Also the metrics' meaning (token-weighted
across micro-batches, grad_norm per update, skipped steps, reward terms, the sampler gap) and
the input checks. Rollouts are scripted (no sampling) unless a test says otherwise."""
import contextlib
import json

import pytest
import torch

from common.errors import UserError
from common.grpo import GRPOConfig, train_grpo
from common.rewards import per_rollout, reward_stats, score_groups
from common.models import load_policy
from common.rollout import Rollout, run_rollouts
from helpers import scripted_rollouts


@pytest.fixture()
def lora(tmp_path):
    """A fresh LoRA moved off zero, so policy != reference (adapter off) and KL has a gradient."""
    policy = load_policy("tiny", seed=0)
    g = torch.Generator().manual_seed(3)
    for p in policy.trainable_parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    policy._tmp = str(tmp_path)
    return policy


def run_loop(policy, lengths, rewards, rows=None, truncated=(), **cfg_kw):
    """One train_grpo step on fixed rollouts (those of `rows` only, if given; the ones listed in
    `truncated` marked as cut by a token limit); returns (metrics row, grads before clipping)."""
    rollouts = scripted_rollouts(lengths)
    for i in truncated:
        rollouts[i].truncated = True
    rollouts = rollouts if rows is None else [rollouts[i] for i in rows]
    captured = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def capture(params, max_norm):
        captured.setdefault("grads", [p.grad.clone() for p in params])
        return real_clip(params, max_norm)
    cfg = GRPOConfig(**{**dict(learning_rate=0.0, num_generations=len(rollouts), prompts_per_step=1,
                               max_steps=1, max_completion_length=max(lengths), max_grad_norm=1e9,
                               logprob_chunk_tokens=7), **cfg_kw})
    torch.nn.utils.clip_grad_norm_ = capture
    # pi_ref = the adapter-off model here (as for a fresh LoRA), so that KL and its gradient are
    # non-zero at this first step; which reference a run uses is test_core's
    # test_reference_is_the_starting_adapter
    policy.frozen_reference = contextlib.nullcontext
    try:
        train_grpo(policy, [{"id": 0}], lambda p, ex, c: [Rollout(**vars(r)) for r in rollouts],
                   lambda group, ex: [{"reward": r} for r in rewards], cfg, out_dir=policy._tmp)
    finally:
        torch.nn.utils.clip_grad_norm_ = real_clip
        del policy.frozen_reference
    row = json.loads(open(f"{policy._tmp}/metrics.jsonl").readlines()[-1])
    return row, captured.get("grads")


def hand_loss(policy, lengths, rewards, *, beta, temperature, loss_type, eps=0.2):
    """The GRPO objective written out from the formulas (DeepSeekMath, arXiv 2402.03300, Sec. 4.1),
    one sequence at a time with the model's full logits: A = (r - mean) / (std + 1e-4), ratio = 1
    (mu = 1),
    k3 KL to the adapter-off model, logits / temperature, mask from the rollouts."""
    rs = scripted_rollouts(lengths)
    r = torch.tensor(rewards)
    A = (r - r.mean()) / (r.std() + 1e-4)
    per_seq, tok_sum, n_tok, kl_sum = [], 0.0, 0.0, 0.0
    for b, ro in enumerate(rs):
        ids = torch.tensor([ro.prompt_ids + ro.ids])
        P, n = len(ro.prompt_ids), len(ro.ids)
        # (n, V)
        logits = policy.model(input_ids=ids).logits[0, P - 1: P + n - 1].float() / temperature
        logp = logits.log_softmax(-1).gather(-1, ids[0, P:, None]).squeeze(-1)               # (n,)
        with torch.no_grad(), policy.model.disable_adapter():
            ref = (policy.model(input_ids=ids).logits[0, P - 1: P + n - 1].float() / temperature
                   ).log_softmax(-1).gather(-1, ids[0, P:, None]).squeeze(-1)
        m = torch.tensor(ro.mask, dtype=torch.float)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        loss_t = -torch.exp(logp - logp.detach()) * A[b] + beta * kl
        per_seq.append((loss_t * m).sum() / m.sum())
        tok_sum = tok_sum + (loss_t * m).sum()
        n_tok += m.sum()
        kl_sum += (kl * m).sum().item()
    loss = torch.stack(per_seq).mean() if loss_type == "grpo" else tok_sum / n_tok
    return loss, kl_sum / n_tok.item()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_loop_matches_the_objective_by_hand(lora, loss_type):
    """Logged loss, KL and gradient norm == the hand-written objective's. A wrong reference
    (KL to the policy itself), mask (observation tokens trained), temperature (logits not
    divided) or normaliser (grpo vs token mean) each change at least one of them."""
    lengths, rewards = [3, 9, 6, 7], [0.0, 1.0, 2.0, 0.5]
    row, grads = run_loop(lora, lengths, rewards, beta=0.5, temperature=0.7, loss_type=loss_type,
                          micro_batch_size=3)
    params = lora.trainable_parameters()
    lora.model.zero_grad(set_to_none=True)
    loss, kl = hand_loss(lora, lengths, rewards, beta=0.5, temperature=0.7, loss_type=loss_type)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params)).item()
    lora.model.zero_grad(set_to_none=True)
    assert row["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
    assert row["kl"] == pytest.approx(kl, rel=1e-4) and kl > 1e-3
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-3)
    assert row["skipped"] == 0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_microbatches_give_the_full_batch_gradient_and_metrics(lora, loss_type):
    """Ragged micro-batches (4 + 2 rows, different token counts): the same gradient and the same
    logged loss / kl / entropy / clip as one full batch (token-weighted, not averaged)."""
    lengths, rewards = [3, 9, 6, 2, 8, 5], [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]
    full, gf = run_loop(lora, lengths, rewards, beta=0.1, loss_type=loss_type, micro_batch_size=6)
    micro, gm = run_loop(lora, lengths, rewards, beta=0.1, loss_type=loss_type, micro_batch_size=4)
    for a, b in zip(gf, gm):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    for k in ("loss", "kl", "entropy", "clip_ratio/region_mean", "grad_norm"):
        assert micro[k] == pytest.approx(full[k], rel=1e-4, abs=1e-7), k


def test_bnpo_is_trls_per_micro_batch_token_mean(lora):
    """TRL's bnpo: each micro-batch's token mean, micro-batches weighted equally (so with ragged
    micro-batches it differs from dapo's one token mean over the whole batch)."""
    lengths = [3, 9, 6, 2, 8, 5]
    # equal rewards: A = 0, so the loss is beta * KL alone and KL per micro-batch is measurable
    row, _ = run_loop(lora, lengths, [1.0] * 6, beta=0.1, loss_type="bnpo", micro_batch_size=4)
    k1, _ = run_loop(lora, lengths, [1.0] * 4, rows=[0, 1, 2, 3], beta=0.1, loss_type="bnpo",
                     micro_batch_size=4)
    k2, _ = run_loop(lora, lengths, [1.0] * 2, rows=[4, 5], beta=0.1, loss_type="bnpo",
                     micro_batch_size=4)
    rs = scripted_rollouts(lengths)
    n1, n2 = sum(sum(r.mask) for r in rs[:4]), sum(sum(r.mask) for r in rs[4:])
    # TRL's bnpo
    assert row["loss"] == pytest.approx(0.1 * (k1["kl"] + k2["kl"]) / 2, rel=1e-4)
    # token-weighted
    assert row["kl"] == pytest.approx((k1["kl"] * n1 + k2["kl"] * n2) / (n1 + n2), rel=1e-4)
    # != dapo
    assert abs(row["loss"] - 0.1 * row["kl"]) > 1e-3 * row["loss"]


def test_the_header_says_where_the_logged_metrics_differ_from_trl():
    """The module header claims TRL's choices; its logged kl / entropy / clip fractions are
    token-weighted across micro-batches (test_bnpo_is_trls_per_micro_batch_token_mean shows it on
    ragged micro-batches), where TRL averages the micro-batch means: the header says so."""
    import common.grpo
    doc = " ".join(common.grpo.__doc__.split())
    assert "token-weighted across micro-batches" in doc
    assert "TRL logs the mean of the micro-batch means" in doc


def test_grad_norm_for_every_update_and_skipped_steps(lora):
    row, _ = run_loop(lora, [4, 5, 6], [0.0, 1.0, 0.5], num_iterations=2, learning_rate=1e-4)
    assert row["grad_norm/update_1"] > 0 and row["grad_norm/update_2"] > 0
    assert row["grad_norm"] == pytest.approx((row["grad_norm/update_1"]
                                              + row["grad_norm/update_2"]) / 2)
    row, grads = run_loop(lora, [4, 5, 6], [1.0, 1.0, 1.0], drop_zero_std_groups=True)
    assert row["skipped"] == 1 and grads is None and "loss" not in row


def test_reward_functions_with_weights_and_term_stats(lora):
    def acc(group, ex):
        return [{"reward": float(i), "hit": float(i % 2)} for i in range(len(group))]

    def fmt(group, ex):
        return [{"reward": 1.0} for _ in group]
    cfg = GRPOConfig(num_generations=4, prompts_per_step=1, max_steps=1, max_completion_length=9,
                     learning_rate=0.0, reward_weights=[1.0, 0.5])
    rs = scripted_rollouts([3, 4, 5, 6])
    s = train_grpo(lora, [{"id": 0}], lambda p, ex, c: [Rollout(**vars(r)) for r in rs], [acc, fmt],
                   cfg, lora._tmp)["final"]
    assert s["reward"] == pytest.approx((0 + 1 + 2 + 3) / 4 + 0.5)
    assert s["rewards/acc_0/hit"] == 0.5 and s["rewards/acc_0/hit/std"] == pytest.approx(0.57735,
                                                                                         rel=1e-4)
    assert s["rewards/fmt_1/reward"] == 1.0 and s["rewards/fmt_1/reward/std"] == 0.0


def test_a_reward_function_returning_none_is_left_out_as_trl_does(lora):
    """TRL: a None reward is NaN for that function, the functions are combined with nansum
    (a rollout every function left unscored gets 0, with a warning); the term means are over
    the rollouts a function scored, and rewards/<fn>/none_frac counts the Nones."""
    def acc(group, ex):
        return [{"reward": 1.0, "hit": 1.0}, None, {"reward": 3.0, "hit": 0.0}]

    def fmt(group, ex):
        return [{"reward": 4.0}, {"reward": None}, None]
    rs = scripted_rollouts([3, 4, 5])
    with pytest.warns(UserWarning, match="every reward function returned None for 1 rollout"):
        terms = score_groups([acc, fmt], rs, [{"id": 0}], 3, [2.0, 0.5])
    # 2 * 1 + 0.5 * 4; nansum(NaN, NaN) = 0; 2 * 3 + NaN
    assert [t["reward"] for t in terms] == [4.0, 0.0, 6.0]
    st = reward_stats(terms)
    assert st["rewards/acc_0/none_frac"] == pytest.approx(1 / 3)
    assert st["rewards/fmt_1/none_frac"] == pytest.approx(2 / 3)
    assert st["rewards/acc_0/reward"] == 2.0 and st["rewards/fmt_1/reward"] == 4.0
    assert st["rewards/acc_0/hit"] == 0.5 and "rewards/acc_0/none_frac/std" not in st
    # one function: its None is 0 too
    with pytest.warns(UserWarning):
        terms = score_groups(lambda g, ex: [{"reward": 1.0}, None, {"reward": None}], rs,
                             [{"id": 0}], 3, None)
    assert [t["reward"] for t in terms] == [1.0, 0.0, 0.0]
    assert reward_stats(terms)["rewards/none_frac"] == pytest.approx(2 / 3)
    # no None: no none_frac (a run without one logs what it logged before)
    assert not any("none_frac" in k for k in reward_stats(score_groups(
        lambda g, ex: [{"reward": 1.0}] * 3, rs, [{"id": 0}], 3, None)))
    # through the loop: no crash, and the step's reward is the mean of [4, 0, 6]
    cfg = GRPOConfig(num_generations=3, prompts_per_step=1, max_steps=1, max_completion_length=9,
                     learning_rate=0.0, reward_weights=[2.0, 0.5])
    with pytest.warns(UserWarning):
        s = train_grpo(lora, [{"id": 0}], lambda p, ex, c: [Rollout(**vars(r)) for r in rs],
                       [acc, fmt], cfg, lora._tmp)["final"]
    assert s["reward"] == pytest.approx(10 / 3)
    assert s["rewards/fmt_1/none_frac"] == pytest.approx(2 / 3)


def test_input_checks_one_sentence(lora):
    bad = [dict(num_generations=1), dict(temperature=0.0), dict(max_steps=0),
           dict(importance_sampling_level="seq")]
    for kw in bad:
        with pytest.raises(UserError) as e:
            train_grpo(lora, [{"id": 0}], None, None, GRPOConfig(**kw), lora._tmp)
        assert str(e.value).count(".") <= 3 and "\n" not in str(e.value)


def test_sampler_gap_is_logged_and_catches_a_temperature_mismatch(tmp_path):
    """sampling/sampling_logp_difference: ~0 when the sampler and the training pass agree (the
    tiny VLM's only gap is the 5 suppressed vision tokens), large when they do not."""
    p = load_policy("tiny", seed=0)
    data = [{"q": "hello there"}, {"q": "the quick brown fox"}]
    out = {}
    for name, t_sample in (("same", 1.0), ("hotter", 3.0)):
        def rollout_fn(pol, exs, c, t=t_sample):
            return run_rollouts(pol, exs, num_generations=c.num_generations, max_new_tokens=6,
                                make_messages=lambda e: [{"role": "user", "content": e["q"]}],
                                temperature=t)
        s = train_grpo(p, data, rollout_fn,
                       per_rollout(lambda r, ex: {"reward": float(len(r.ids))}),
                       GRPOConfig(num_generations=3, max_steps=1, learning_rate=0.0),
                       str(tmp_path / name))
        out[name] = s["final"]
    same, hot = (out[k]["sampling/sampling_logp_difference/mean"] for k in ("same", "hotter"))
    print(f"sampler gap: same temperature {same:.4f}, sampled at 3x {hot:.4f}")
    assert out["same"]["sampling/sampling_logp_difference/max"] < 0.02 and hot > 5 * same


# each GRPO setting the layout issue made a flag: parsed from a script's command line (gog.py's
# Args), it reaches train_grpo and changes the update it should change
FLAG_EFFECTS = {
    # mu = 2: two optimiser updates per generation batch, each with its own gradient norm
    "--num_iterations=2": lambda base, row: "grad_norm/update_2" in row
    and "grad_norm/update_2" not in base,
    # Dr. GRPO's unscaled advantages: rewards [0, 1, 0.5] have group std 0.5, so the gradient
    # (beta = 0: the surrogate's alone) is the scaled one times (0.5 + 1e-4)
    "--scale_rewards=none": lambda base, row: row["grad_norm"]
    == pytest.approx(base["grad_norm"] * 0.5001, rel=1e-5),
    # GSPO: after the first of two updates the ratio is one per sequence, so the loss differs
    "--importance_sampling_level=sequence": lambda base,
    row: abs(row["loss"] - base["loss"]) > 1e-7,
    # all-equal rewards: the group is left out and nothing is updated
    "--drop_zero_std_groups": lambda base, row: row["skipped"] == 1 and base["skipped"] == 0,
    # a cut completion leaves the loss: the token-weighted statistics change
    "--mask_truncated_completions": lambda base, row: abs(row["loss"] - base["loss"]) > 1e-7,
}


@pytest.mark.parametrize("flag", list(FLAG_EFFECTS))
def test_each_grpo_flag_reaches_the_update_from_the_command_line(lora, flag):
    import gog
    from common.cli import parse_args
    name = flag.split("=")[0].removeprefix("--")
    given = getattr(GRPOConfig.of(parse_args(gog.Args, [flag])), name)   # the script's path
    assert given != getattr(GRPOConfig.of(parse_args(gog.Args, [])), name)
    rewards = [1.0, 1.0, 1.0] if name == "drop_zero_std_groups" else [0.0, 1.0, 0.5]
    common = dict(truncated=[1], beta=0.0)        # rollout 1 has advantage +1
    if name == "importance_sampling_level":
        common.update(num_iterations=2, learning_rate=0.05)
    base, _ = run_loop(lora, [4, 5, 6], rewards, **common)
    row, _ = run_loop(lora, [4, 5, 6], rewards, **common, **{name: given})
    assert FLAG_EFFECTS[flag](base, row), (base, row)
