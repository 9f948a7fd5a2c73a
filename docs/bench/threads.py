"""SmolLM2 fast decode, G=8, 64-token prompt, 32 new tokens: 1 vs 2 torch threads, alternating."""
import sys, time, torch, statistics
sys.path.insert(0, ".")
from common.models import load_policy
from common.chat import encode
from common.generate import CachedGenerator
from common.perf.bench import prompt_text
pol = load_policy("smollm2", lora=True, seed=0)
enc = encode(pol.tokenizer, None, [{"role": "user", "content": prompt_text(pol.tokenizer, 64, 0)}], add_generation_prompt=True)
res = {1: [], 2: []}
for rep in range(4):
    for n in (1, 2):
        torch.set_num_threads(n)
        t = time.perf_counter()
        CachedGenerator(force_length=True)(pol, [enc] * 8, max_new_tokens=32, temperature=1.0)
        res[n].append(time.perf_counter() - t)
for n, v in res.items():
    print(f"{n} thread(s): median {statistics.median(v):.2f} s = {256 / statistics.median(v):.1f} tok/s", [round(x, 2) for x in v])
