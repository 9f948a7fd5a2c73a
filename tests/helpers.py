"""Shared by the test files: run a script or module the way a user would."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def all_tags_grammar():
    """Every tag style the project's scripts use, in one Grammar (for core tests of the parser
    and loop)."""
    from common.tools import Grammar
    return Grammar(tags={"search": "text_search", "text_search": "text_search",
                         "image_search": "image_search", "tool_call": "tool_call",
                         "answer": "answer"},
                   tool_names={"crop": "crop", "image_zoom_in_tool": "crop",
                               "text_search": "text_search", "search": "text_search",
                               "image_search": "image_search"},
                   free=("think", "reason"))


def run_script(target: str, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python <target.py> argv...` (or `python -m <target>` for a module) from the repo root,
    offline and with one torch thread (more threads than free cores slow torch down a lot)."""
    cmd = [os.path.join(ROOT, target)] if target.endswith(".py") else ["-m", target]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT,
               MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *cmd, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def perturb_lora(policy, std: float, seed: int = 0) -> None:
    """Draw every LoRA B matrix of `policy` from N(0, std) (peft starts them at zero): a young,
    non-zero adapter, so merging it or switching it off does some work."""
    import torch

    from common.logprobs import unwrap
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, prm in unwrap(policy.model).named_parameters():
            if "lora_B" in n:
                prm.normal_(0, std, generator=g)


def scripted_rollouts(lengths, seed=0):
    """Fixed rollouts (no sampling) for loop tests: prompts of 2 lengths, completions of `lengths`
    tokens of the tiny tokenizer, token 2 of the longer ones an observation (mask 0)."""
    import torch

    from common.models import build_tiny_tokenizer
    from common.rollout import Rollout
    g = torch.Generator().manual_seed(seed)
    vocab = len(build_tiny_tokenizer()) - 40   # plain BPE ids, below the special tokens
    out = []
    for i, n in enumerate(lengths):
        prompt = torch.randint(0, vocab, (6 + 3 * (i % 2),), generator=g).tolist()
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        mask = [1] * n
        if n > 4:
            mask[2] = 0   # a tool-observation-like token: not trained on
        out.append(Rollout(prompt_ids=prompt, ids=ids, mask=mask, done=True, stop_reason="end",
                           sample_logps=None))
    return out
