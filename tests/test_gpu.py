# Run: pytest -m gpu tests/test_gpu.py -q      (needs CUDA; skipped elsewhere)
"""The CUDA path: NF4 + LoRA on the GPU, bf16 compute, one GRPO step, memory reported."""
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_nf4_grpo_step_on_cuda(tmp_path):
    from common.grpo import GRPOConfig, per_rollout, train_grpo
    from common.models import load_policy
    from common.rollout import run_rollouts
    p = load_policy("tiny", load_in_4bit=True, gradient_checkpointing=True, device="cuda")
    assert p.device.type == "cuda"
    data = [{"q": "Say something"}]
    fn = lambda pol, exs, c: run_rollouts(pol, exs, num_generations=c.num_generations,
                                          make_messages=lambda e: [{"role": "user", "content": e["q"]}],
                                          max_new_tokens=c.max_completion_length)
    rew = per_rollout(lambda r, ex: {"reward": float(sum(r.ids) % 5)})
    torch.cuda.reset_peak_memory_stats()
    s = train_grpo(p, data, fn, rew, GRPOConfig(max_steps=2, num_generations=4, max_completion_length=16,
                                                 beta=0.04, prompts_per_step=1), str(tmp_path))
    assert s["final"]["loss"] == s["final"]["loss"]  # finite
    print("peak MiB", torch.cuda.max_memory_allocated() / 2**20)
