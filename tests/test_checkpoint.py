# Run: OMP_NUM_THREADS=1 pytest tests/test_checkpoint.py -q
"""Checkpoints: atomic saves, incomplete folders skipped, torn metrics lines, no pickle,
--resume without a checkpoint, and SFT resume that continues exactly."""
import os
import shutil

import pytest
import torch

from common import checkpoint as ck
from common.chat import encode
from common.errors import UserError
from common.grpo import GRPOConfig, train_grpo
from common.models import load_policy
from common.rollout import Rollout
from common.runlog import RunLog
from common.sft import SFTConfig, train_sft


def grpo_run(out, steps=2, resume=False, save_steps=2):
    p = load_policy("tiny", seed=1)
    ro = [Rollout(prompt_ids=[5, 6, 7], ids=[8 + i, 9, 10], mask=[1, 1, 1], done=True)
          for i in range(2)]
    train_grpo(p, [{"id": 0}], lambda pol, ex, c: [Rollout(**vars(r)) for r in ro],
               lambda g, ex: [{"reward": float(i)} for i in range(len(g))],
               GRPOConfig(num_generations=2, prompts_per_step=1, max_steps=steps,
                          save_steps=save_steps,
                          learning_rate=1e-2, max_completion_length=3), str(out), resume=resume)
    return p


def test_incomplete_checkpoints_are_skipped_and_saves_are_atomic(tmp_path, monkeypatch):
    grpo_run(tmp_path)
    os.makedirs(tmp_path / "checkpoint-3")                     # a SIGKILL during the old save
    os.makedirs(tmp_path / ".checkpoint-4.tmp")
    assert ck.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    p = load_policy("tiny", seed=1)
    opt = torch.optim.AdamW(p.trainable_parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed while writing trainer_state.pt")
    monkeypatch.setattr(ck.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(p, opt, sched, 5, str(tmp_path))
    assert not (tmp_path / "checkpoint-5").exists()            # never a half-written checkpoint
    assert ck.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


def test_resume_without_a_checkpoint_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="no complete checkpoint in"):
        grpo_run(tmp_path / "empty", resume=True)


def test_a_planted_pickle_does_not_run(tmp_path):
    grpo_run(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"step": 2, "x": Evil()}, tmp_path / "checkpoint-2" / "trainer_state.pt")
    with pytest.raises(ValueError, match="not a checkpoint this code wrote"):
        grpo_run(tmp_path, steps=3, resume=True)
    assert not marker.exists()


def test_checkpoint_state_is_plain_tensors_and_restores_every_rng(tmp_path):
    import random

    import numpy as np
    grpo_run(tmp_path)
    # no pickle needed
    state = torch.load(tmp_path / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    random.random(), np.random.rand(), torch.rand(1)
    ck.set_rng_state(state["rng"])
    a = (random.random(), float(np.random.rand()), torch.rand(1).item())
    ck.set_rng_state(state["rng"])
    assert a == (random.random(), float(np.random.rand()), torch.rand(1).item())


def test_torn_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward": 1.0}\n{"step": 1, "rew')
    log = RunLog(str(tmp_path), resume=True)
    assert log.history == [{"step": 0, "reward": 1.0}]
    assert "last line is incomplete" in capsys.readouterr().out


def sft_data(tok):
    msgs = [[{"role": "user", "content": f"question {i}"},
             {"role": "assistant", "content": f"answer {i} " * (i + 1)}]
            for i in range(6)]
    return [encode(tok, None, m) for m in msgs]


def test_sft_resume_continues_exactly(tmp_path):
    cfg = dict(batch_size=2, micro_batch_size=1, epochs=2.0, learning_rate=5e-3, save_steps=2, seed=3)
    p = load_policy("tiny", seed=1)
    train_sft(p, sft_data(p.tokenizer), SFTConfig(**cfg), str(tmp_path / "a"))   # 6 steps
    os.makedirs(tmp_path / "b")
    # "killed" at step 2
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    q = load_policy("tiny", seed=1)
    torch.manual_seed(99)
    train_sft(q, sft_data(q.tokenizer), SFTConfig(**cfg, resume=True), str(tmp_path / "b"))
    fa, fb = dict(p.model.named_parameters()), dict(q.model.named_parameters())
    for n, x in fa.items():
        if x.requires_grad:
            assert torch.allclose(x, fb[n], atol=1e-6), n
    with pytest.raises(UserError):
        train_sft(q, sft_data(q.tokenizer), SFTConfig(**cfg, resume=True), str(tmp_path / "c"))
