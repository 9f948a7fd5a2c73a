# Run: OMP_NUM_THREADS=1 pytest tests/test_checkpoint.py -q
"""Checkpoints: atomic saves, incomplete folders skipped, torn metrics lines, no pickle,
--resume without a checkpoint, and SFT resume that continues exactly. Stale checkpoints: a fresh
run into an older run's checkpoints refuses (or clears them with overwrite_output_dir), a resume
with other training arguments names them, a resume of a finished run changes nothing, and
save_total_limit keeps the last N (GRPO and SFT alike)."""
import json
import os
import shutil
from dataclasses import asdict, fields

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


def grpo_run(out, steps=2, resume=False, save_steps=2, **cfg_kw):
    p = load_policy("tiny", seed=1)
    ro = [Rollout(prompt_ids=[5, 6, 7], ids=[8 + i, 9, 10], mask=[1, 1, 1], done=True)
          for i in range(2)]
    p.summary = train_grpo(p, [{"id": 0}], lambda pol, ex, c: [Rollout(**vars(r)) for r in ro],
                           lambda g, ex: [{"reward": float(i)} for i in range(len(g))],
                           GRPOConfig(**{**dict(num_generations=2, prompts_per_step=1,
                                                max_steps=steps, save_steps=save_steps,
                                                learning_rate=1e-2, max_completion_length=3),
                                         **cfg_kw}),
                           str(out), resume=resume)
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
    with pytest.raises(UserError, match="not a checkpoint this code wrote") as e:
        grpo_run(tmp_path, steps=3, resume=True)
    assert not marker.exists()
    # a user error, with no chained torch error whose text says "weights_only=False" would work
    assert e.value.__cause__ is None and e.value.__suppress_context__


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
    cfg = dict(batch_size=2, micro_batch_size=1, epochs=2.0, learning_rate=5e-3, save_steps=2,
               seed=3)
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


# ---------------------------------------------------------------------------------------------
# stale checkpoints: one run's checkpoints are never taken for another's
# ---------------------------------------------------------------------------------------------
def checkpoints(out):
    return sorted((d for d in os.listdir(out) if d.startswith("checkpoint-")),
                  key=lambda d: int(d.split("-")[1]))


def steps_logged(out):
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]


def test_a_fresh_run_into_an_old_runs_checkpoints_refuses_or_clears_them(tmp_path, capsys):
    grpo_run(tmp_path, steps=4)                      # the old run: checkpoint-2, checkpoint-4
    before = {f: os.path.getmtime(tmp_path / f) for f in os.listdir(tmp_path)}
    with pytest.raises(UserError) as e:
        grpo_run(tmp_path, steps=2)                  # a new run, same --out, no --resume
    msg = str(e.value)
    assert str(tmp_path) in msg and "checkpoint-4" in msg and "\n" not in msg
    assert "--resume" in msg and "--overwrite_output_dir" in msg
    assert {f: os.path.getmtime(tmp_path / f) for f in os.listdir(tmp_path)} == before
    # overwrite_output_dir: the old checkpoints go, the new run is the only one
    grpo_run(tmp_path, steps=2, overwrite_output_dir=True)
    assert "deleted" in capsys.readouterr().out
    assert checkpoints(tmp_path) == ["checkpoint-2"] and steps_logged(tmp_path) == [0, 1]
    # the reproduction: a later --resume continues this run (it logged [0,1,2,3,10,11])
    grpo_run(tmp_path, steps=3, resume=True)
    assert steps_logged(tmp_path) == [0, 1, 2]
    with pytest.raises(UserError, match="overwrite_output_dir"):   # both: a contradiction
        grpo_run(tmp_path, steps=4, resume=True, overwrite_output_dir=True)


def test_checkpoints_hold_the_training_arguments(tmp_path):
    p = grpo_run(tmp_path, steps=2)
    state = torch.load(tmp_path / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert state["args"] == p.summary["config"]
    assert state["args"]["learning_rate"] == 1e-2 and state["args"]["max_steps"] == 2
    names = {f.name for f in fields(GRPOConfig)}
    assert set(ck.MAY_CHANGE_ON_RESUME) <= names
    assert set(ck.MAY_CHANGE_ON_RESUME) == {"max_steps", "save_steps", "save_total_limit",
                                            "resume", "overwrite_output_dir",
                                            "logprob_chunk_tokens", "vision_once"}


def test_resume_with_other_training_arguments_names_them_and_stops(tmp_path):
    grpo_run(tmp_path, steps=2)
    before = open(tmp_path / "metrics.jsonl").read()
    with pytest.raises(UserError) as e:   # the stale optimiser state would override the rate
        grpo_run(tmp_path, steps=3, resume=True, learning_rate=1e-3, beta=0.0)
    msg = str(e.value)
    assert "learning_rate: 0.01 -> 0.001" in msg and "beta: 0.001 -> 0.0" in msg
    assert "checkpoint-2" in msg and "\n" not in msg and "max_steps" not in msg
    assert open(tmp_path / "metrics.jsonl").read() == before and checkpoints(tmp_path) == [
        "checkpoint-2"]
    # the fields a resume may change (to extend a run, save otherwise, or use less memory)
    grpo_run(tmp_path, steps=3, resume=True, save_steps=1, save_total_limit=3,
             logprob_chunk_tokens=2, vision_once=False)
    assert steps_logged(tmp_path) == [0, 1, 2]


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    grpo_run(tmp_path, steps=2)
    files = [tmp_path / "summary.json", tmp_path / "metrics.jsonl",
             tmp_path / "adapter" / "adapter_model.safetensors",
             tmp_path / "adapter" / "adapter_config.json",
             tmp_path / "checkpoint-2" / "trainer_state.pt"]
    before = [(f.read_bytes(), os.stat(f).st_mtime_ns) for f in files]
    listing = sorted(os.listdir(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    capsys.readouterr()
    p = grpo_run(tmp_path, steps=2, resume=True)
    out = capsys.readouterr().out
    assert "already at max_steps=2; nothing to do" in out
    assert [(f.read_bytes(), os.stat(f).st_mtime_ns) for f in files] == before
    assert sorted(os.listdir(tmp_path)) == listing
    assert p.summary == summary and p.summary["final"]         # the run's own summary, not {}


def test_save_total_limit_keeps_the_last_checkpoints_and_resume_works(tmp_path, capsys):
    grpo_run(tmp_path / "a", steps=4, save_steps=1, save_total_limit=2)
    assert checkpoints(tmp_path / "a") == ["checkpoint-3", "checkpoint-4"]
    capsys.readouterr()
    p = grpo_run(tmp_path / "a", steps=5, save_steps=1, save_total_limit=2, resume=True)
    assert "at step 4" in capsys.readouterr().out
    assert checkpoints(tmp_path / "a") == ["checkpoint-4", "checkpoint-5"]
    assert steps_logged(tmp_path / "a") == [0, 1, 2, 3, 4]
    q = grpo_run(tmp_path / "b", steps=5, save_steps=1)         # uninterrupted, every checkpoint
    assert checkpoints(tmp_path / "b") == [f"checkpoint-{i}" for i in range(1, 6)]
    fp, fq = dict(p.model.named_parameters()), dict(q.model.named_parameters())
    for n, x in fq.items():
        if x.requires_grad:
            assert torch.allclose(x, fp[n], atol=1e-6), n
    with pytest.raises(UserError, match="save_total_limit"):
        grpo_run(tmp_path / "c", steps=1, save_total_limit=0)


def test_sft_stale_checkpoints_and_training_arguments(tmp_path, capsys):
    cfg = dict(batch_size=2, micro_batch_size=1, epochs=1.0, learning_rate=5e-3, save_steps=1,
               seed=3)
    p = load_policy("tiny", seed=1)
    data = sft_data(p.tokenizer)
    out = str(tmp_path)
    train_sft(p, data, SFTConfig(**cfg), out)                                   # 3 steps
    state = torch.load(tmp_path / "checkpoint-3" / "trainer_state.pt", weights_only=True)
    assert state["args"] == asdict(SFTConfig(**cfg))
    with pytest.raises(UserError) as e:
        train_sft(p, data, SFTConfig(**cfg), out)
    assert "checkpoint-3" in str(e.value) and "--overwrite_output_dir" in str(e.value)
    with pytest.raises(UserError, match=r"learning_rate: 0.005 -> 0.001"):
        train_sft(p, data, SFTConfig(**{**cfg, "learning_rate": 1e-3}, resume=True), out)
    train_sft(p, data, SFTConfig(**cfg, overwrite_output_dir=True, max_steps=1), out)
    assert checkpoints(tmp_path) == ["checkpoint-1"] and steps_logged(tmp_path) == [0]
