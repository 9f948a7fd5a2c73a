"""Where SmolLM2's fast decode spends its time: torch.profiler op self-time over one 32-token G=8 call."""
import sys, time, torch
sys.path.insert(0, ".")
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
from torch.profiler import profile, ProfilerActivity
from common.models import load_policy
from common.chat import encode
from common.generate import CachedGenerator
from common.perf.bench import prompt_text
pol = load_policy("smollm2", lora=True, seed=0)
enc = encode(pol.tokenizer, None, [{"role": "user", "content": prompt_text(pol.tokenizer, 64, 0)}], add_generation_prompt=True)
CachedGenerator(force_length=True)(pol, [enc] * 8, max_new_tokens=4, temperature=1.0)
t = time.perf_counter()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    CachedGenerator(force_length=True)(pol, [enc] * 8, max_new_tokens=32, temperature=1.0)
wall = time.perf_counter() - t
print(f"wall {wall:.2f} s for 32 tokens x 8 rows = {256 / wall:.1f} tok/s (profiled)")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
