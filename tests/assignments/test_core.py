# Run: pytest tests/assignments/test_core.py -q     (seconds; docs/assignments/core.md)
"""Grader of the GRPO core assignment: each test checks a part's behaviour against values worked
out by hand (in the comments), never against a copy of the reference. `-k <part>` runs a part."""
import math
from types import SimpleNamespace

import pytest
import torch

from common.grpo import group_advantages, grpo_loss
from common.logprobs import _logp_chunk, completion_logprobs
from common.models import build_tiny_tokenizer
from common.rollout import Rollout, _splice, rollout_batch, user_segment


# ---------------------------------------------------------------------------- group_advantages
def test_group_advantages_group_scaling():
    # group 1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.57735; group 2: all equal -> 0
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4, "group")
    s = math.sqrt(1 / 3)
    want = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0]
    assert a.tolist() == pytest.approx(want, abs=1e-5)


def test_group_advantages_batch_and_none_scaling():
    r = torch.tensor([1.0, 0.0, 3.0, 3.0])               # groups of 2: means 0.5 and 3
    # none (Dr. GRPO): centred only
    assert group_advantages(r, 2, "none").tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    # batch: one std over all 4 rewards: mean 1.75, sum of squares 0.5625+3.0625+1.5625*2 = 6.75
    std = math.sqrt(6.75 / 3)
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0]
    assert group_advantages(r, 2, "batch").tolist() == pytest.approx(want, abs=1e-5)


def test_group_advantages_unknown_scaling_is_an_error():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 2, "rank")


# ----------------------------------------------------------------------------------- grpo_loss
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])     # 2 and 1 generated tokens
ADV = torch.tensor([1.0, -3.0])


def on_policy(**kw):
    logp = torch.full((2, 3), -1.0)
    return grpo_loss(logp, logp.clone(), None, ADV, MASK, **kw)[0].item()


def test_grpo_loss_aggregations_on_policy():
    # ratio = 1, so the per-token loss is -A: row 0 = [-1, -1, (pad)], row 1 = [3, (pad), (pad)]
    assert on_policy(loss_type="grpo") == pytest.approx(((-2 / 2) + (3 / 1)) / 2)     # 1
    assert on_policy(loss_type="bnpo") == pytest.approx((-2 + 3) / 3)
    assert on_policy(loss_type="dr_grpo", max_completion_length=4) == pytest.approx(1 / 8)
    assert on_policy(loss_type="dapo", num_items_in_batch=10) == pytest.approx(1 / 10)
    assert on_policy(loss_type="dapo") == pytest.approx(1 / 3)    # default: this batch's tokens


def test_grpo_loss_unknown_type_and_missing_length_are_errors():
    with pytest.raises(ValueError):
        on_policy(loss_type="sum")
    with pytest.raises(ValueError):
        on_policy(loss_type="dr_grpo")


@pytest.mark.parametrize("ratio, adv, eps_high, want", [
    (1.5, 1.0, None, -1.2),    # min(1.5, 1.2) * 1: clipped at 1 + eps
    (1.5, -1.0, None, 1.5),    # min(-1.5, -1.2): the unclipped (pessimistic) term
    (0.5, 1.0, None, -0.5),    # min(0.5, 0.8)
    (0.5, -1.0, None, 0.8),    # min(-0.5, -0.8): clipped at 1 - eps
    (1.5, 1.0, 0.28, -1.28),   # DAPO's clip-higher: 1 + eps_high
])
def test_grpo_loss_clipping(ratio, adv, eps_high, want):
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, _ = grpo_loss(logp, old, None, torch.tensor([adv]), torch.ones(1, 1), epsilon=0.2,
                        epsilon_high=eps_high)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    loss.backward()   # a clipped token gets no gradient; an unclipped one d(-ratio*A)/dlogp
    clipped = abs(want) != abs(ratio * adv)
    assert logp.grad.item() == pytest.approx(0.0 if clipped else -ratio * adv, abs=1e-6)


def test_grpo_loss_k3_kl():
    # ref - logp = log 2 on every token: k3 = 2 - log 2 - 1 = 0.30685; A = 0 leaves beta * k3
    logp = torch.zeros(1, 2)
    ref = torch.full((1, 2), math.log(2.0))
    loss, stats = grpo_loss(logp, logp.clone(), ref, torch.zeros(1), torch.ones(1, 2), beta=0.1)
    k3 = 2 - math.log(2) - 1
    assert loss.item() == pytest.approx(0.1 * k3, abs=1e-6)
    assert stats["kl"] == pytest.approx(k3, abs=1e-6)
    # k3 is >= 0 and 0 only where the policy equals the reference
    loss0, stats0 = grpo_loss(logp, logp.clone(), logp.clone(), torch.zeros(1),
                              torch.ones(1, 2), beta=0.1)
    assert loss0.item() == 0.0 and stats0["kl"] == 0.0


def test_grpo_loss_clip_statistics():
    # tokens with ratios 1.5, 1.0, 0.5 and A = +1: only the 1.5 is clipped (high); 1/3 of tokens
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5]]))
    _, stats = grpo_loss(logp, torch.zeros(1, 3), None, torch.ones(1), torch.ones(1, 3))
    assert stats["clip_ratio/high_mean"] == pytest.approx(1 / 3)
    assert stats["clip_ratio/low_mean"] == 0.0


def test_grpo_loss_sequence_level_gspo():
    # one ratio per sequence: exp(mean of the masked log-ratios) = exp((log 1.1 + log 1.3) / 2)
    logp = torch.log(torch.tensor([[1.1, 1.3, 9.0]]))            # the 9.0 is padding
    loss, _ = grpo_loss(logp, torch.zeros(1, 3), None, torch.ones(1),
                        torch.tensor([[1.0, 1.0, 0.0]]), importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-math.sqrt(1.1 * 1.3), abs=1e-6)


# -------------------------------------------------------------------- splice: masks across turns
def rollout(prompt, generated):
    r = Rollout(prompt_ids=list(prompt))
    r.ids, r.mask, r.sample_logps = list(generated), [1] * len(generated), [-0.5] * len(generated)
    return r


def test_splice_appends_observation_with_mask_zero():
    r = rollout([1, 2, 3], [10, 11])
    assert _splice(r, [50, 51, 52], [], [], [], max_total_tokens=100) is True
    assert r.ids == [10, 11, 50, 51, 52] and r.mask == [1, 1, 0, 0, 0]
    assert r.sample_logps == [-0.5, -0.5, 0.0, 0.0, 0.0] and not r.done


def test_splice_ends_a_rollout_whose_observation_leaves_no_room():
    r = rollout([1], [10, 11])
    # 2 generated + 3 observation tokens = 5 >= 5: no room left for a reply
    assert _splice(r, [50, 51, 52], [], [], [], max_total_tokens=5) is False
    assert r.done and r.stop_reason == "observation_overflow"
    assert r.ids == [10, 11] and r.mask == [1, 1]


def test_splice_masks_the_chat_template_between_turns():
    # a user turn spliced after a cut assistant turn: <|im_end|>, the user header, the text, the
    # next assistant header: every one of those tokens is mask 0, the replies mask 1
    tok = build_tiny_tokenizer()
    policy = SimpleNamespace(tokenizer=tok, image_processor=None, is_vlm=False)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    r = rollout(ids("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), ids("Hello"))
    seg, _, _, _ = user_segment(policy, [{"type": "text", "text": "and then?"}], close_turn=True)
    assert _splice(r, seg, [], [], [], max_total_tokens=1000)
    r.ids += ids("Bye")
    r.mask += [1] * len(ids("Bye"))
    masked = tok.decode([i for i, m in zip(r.ids, r.mask) if m == 0])
    assert masked == "<|im_end|>\n<|im_start|>user\nand then?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode([i for i, m in zip(r.ids, r.mask) if m == 1]) == "HelloBye"


# ------------------------------------------------------------------------------- rollout_batch
def test_rollout_batch_layout_and_completion_mask():
    a = rollout([1, 2, 3], [10, 11])
    _splice(a, [50], [], [], [], 100)
    a.ids, a.mask = a.ids + [12], a.mask + [1]         # completion: 10 11 (50) 12
    b = rollout([4], [20])
    batch = rollout_batch([a, b], SimpleNamespace(pad_token_id=0))
    # P = 3 (longest prompt), T = 4 (longest completion); prompts left-padded, completions right
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 50, 12],
                                           [0, 0, 4, 20, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1],
                                                [0, 0, 1, 1, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[1, 1, 0, 1], [1, 0, 0, 0]]
    assert "pixel_values" not in batch


def test_rollout_batch_empty_completions_keep_one_column():
    batch = rollout_batch([rollout([5, 6], [])], SimpleNamespace(pad_token_id=0))
    assert batch["input_ids"].tolist() == [[5, 6, 0]]
    assert batch["completion_mask"].tolist() == [[0]]


# --------------------------------------------------------------------------------- logp_chunk
def test_logp_chunk_at_temperature():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 7, bias=False)
    h, targets = torch.randn(2, 3, 4), torch.tensor([[0, 6, 3], [1, 1, 2]])
    for temp in (1.0, 0.7):
        with torch.no_grad():
            z = (h @ head.weight.T) / temp                             # (B, c, V)
            want = torch.log_softmax(z, -1).gather(-1, targets[..., None])[..., 0]
            p = torch.softmax(z, -1)
            want_ent = -(p * torch.log_softmax(z, -1)).sum(-1)
        logp, ent = _logp_chunk(head, h, targets, temp)             # grad enabled
        assert torch.allclose(logp, want, atol=1e-5), temp
        assert torch.allclose(ent, want_ent, atol=1e-5), temp
        assert logp.requires_grad and not ent.requires_grad
        with torch.no_grad():                                       # no-grad pass: zeros
            logp2, ent2 = _logp_chunk(head, h, targets, temp)
        assert torch.allclose(logp2, want, atol=1e-5) and not ent2.any()


class ToyLM(torch.nn.Module):
    """An embedding as the body, a linear head: enough for completion_logprobs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.head = torch.nn.Embedding(9, 4), torch.nn.Linear(4, 9, bias=False)
        self.model = lambda input_ids, attention_mask=None, use_cache=False: SimpleNamespace(
            last_hidden_state=self.emb(input_ids))

    def get_output_embeddings(self):
        return self.head


def test_logp_chunk_through_completion_logprobs_shifts_by_one():
    # the log-prob of completion token t comes from the hidden state one position earlier
    lm = ToyLM()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])                    # P = 2 prompt + T = 4
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "completion_mask": torch.ones(1, 4)}
    logp, _ = completion_logprobs(lm, batch, temperature=0.5, chunk_tokens=3)  # chunks 3 + 1
    with torch.no_grad():
        z = lm.head(lm.emb(ids[0, 1:5])) / 0.5                      # positions 1..4 predict 2..5
        want = torch.log_softmax(z, -1)[torch.arange(4), ids[0, 2:6]]
    assert torch.allclose(logp[0], want, atol=1e-5)
