# Run: pytest tests/test_estimate.py -q   (CPU, ~1 minute; the reduced-3B check, 10-30 min: -m slow)
"""common/perf/estimate.py: the memory of one GRPO step from a config, checked against the models
and against measured CPU peaks.

What is measured (`python -m common.perf.bench --exact_rss`): the increment of the peak RSS of
one GRPO step over the RSS at its start, in a fresh process per configuration, after one warm-up
step (so lazy imports, the AdamW state and one-time buffers are in the baseline, as they are
before any step of a real run), with glibc serving every allocation >= 64 KiB by mmap and
returning it on free (so RSS follows live tensors rather than what malloc keeps), peak RSS reset
through /proc/self/clear_refs at the start of the step. The step is the core's: run_rollouts
with common.generate.CachedGenerator (forced-length completions, so the token counts are
exact), then common.grpo.update. The estimate is the "one GRPO step over the weights" line
(`step`): max(generation, no-grad passes, training micro-batch) + the rollout batch. Both sides
run the same settings, float32, no NF4, rows of equal length (--no-ragged), beta 0.

Tolerance 15 %; it holds at 1-3 % for every part checked here. What the CPU cannot check, and is
counted by reasoning only (docs/perf.md, "Memory estimate"): CUDA's kernels (SDPA's
memory-efficient kernel, bitsandbytes' CUDA dequantisation: counted as one bf16 weight at a
time; the CPU backend holds ~1.5 of them, 20 MB more than counted on a 2048-wide layer), the
CUDA context and the caching allocator's fragmentation (not counted: budgets are judged on
max_memory_allocated). bfloat16 with the fp32 LoRA copies, NF4 and padded rows were checked
against torch.profiler's memory timeline of one training micro-batch on a CPU while the
estimator was written (within 0-4 %, NF4 7-10 % low: the dequantisation above)."""
import json

import pytest
import torch

from common.chat import encode
from common.models import build_tiny_tokenizer, image_processor_for, load_policy
from common.perf import estimate
from common.perf.bench import make_messages, noise_image, prompt_text, qwen25vl_config
from helpers import run_script

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
TOLERANCE = 0.15


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, llm, vision", [("3b", 3.09e9, 669e6), ("7b", 7.62e9, 677e6)])
def test_parameter_counts_match_the_published_models(size, llm, vision):
    """The counts the estimate uses are the parameters of the model built from the published
    config (the bench's table, on the meta device: no memory), 3.75B and 8.29B in all."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            qwen25vl_config(size, build_tiny_tokenizer()))
    got = {"llm": 0, "vision": 0}
    for n, p in model.named_parameters():
        got["vision" if "visual" in n else "llm"] += p.numel()
    a, key = estimate.arch_of(f"qwen2.5-vl-{size}")
    assert key == size
    assert got["llm"] == estimate.llm_linear_params(a) + estimate.llm_other_params(a)
    assert got["vision"] == estimate.vision_params(a)
    assert got["llm"] == pytest.approx(llm, rel=0.005)
    assert got["vision"] == pytest.approx(vision, rel=0.005)


def test_lora_count_matches_peft():
    p = load_policy("tiny", lora_r=8)
    a, _ = estimate.arch_of("tiny")
    assert sum(q.numel() for q in p.trainable_parameters()) == estimate.lora_params(a, 8)


def test_vision_tokens_follow_max_pixels():
    assert estimate.vision_tokens(448, None, 1280 * 28 * 28) == 256
    assert estimate.vision_tokens(2000, None, 1280 * 28 * 28) <= 1280
    assert estimate.vision_tokens(2000, None, None) == (2002 // 28) ** 2    # Qwen's 12.8 MP cap
    assert estimate.vision_tokens(0, None, None) == 0


# ---------------------------------------------------------------------------------------------
# the GPU budget settings
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, budget", [("qwen2.5-vl-3b", 12), ("Qwen/Qwen2.5-VL-7B-Instruct",
                                                                    16)])
def test_budget_settings_fit_with_checkpointing_only(model, budget):
    """G = 8, one 448x448 image, 512 new tokens, micro-batch 8, LoRA r 8, NF4, bf16: the design
    budget holds with gradient checkpointing and is far exceeded without it."""
    e = estimate.estimate(estimate.Args(model=model))
    assert e["budget_gb"] == budget and e["vision_tokens_per_image"] == 256
    assert e["total"] == e["total_gc"] < budget * estimate.GB < 3 * budget * estimate.GB < \
        e["total_no_gc"]
    assert e["step"] == max(e["train"], e["generation"], e["nograd_pass"]) + e["batch"]
    assert e["total"] == e["weights"] + e["lora_state"] + e["step"]
    assert e["merged_lora"] == 0                      # NF4: no merged copies while decoding
    text = estimate.report(e, estimate.Args(model=model))
    for line in ("weights", "LoRA + AdamW state", "activations per micro-batch", "log-prob chunk",
                 "KV cache for generation", "vision tokens per image", "total"):
        assert line in text, line
    assert f"fits the {budget} GB budget" in text


def test_estimate_from_the_command_line(tmp_path):
    out = run_script("common.perf.bench", "--estimate", "--model", "qwen2.5-vl-7b",
                     "--num_generations", "8", "--image_size", "448", "--max_new_tokens", "512",
                     "--micro_batch_size", "8", "--load_in_4bit", "--gradient_checkpointing",
                     "--steps", "3", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fits the 16 GB budget" in out.stdout and "log-prob chunk" in out.stdout
    out = run_script("common.perf.estimate", "--model", str(tmp_path / "nowhere"), timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: no config for")


# ---------------------------------------------------------------------------------------------
# against measured CPU peaks
# ---------------------------------------------------------------------------------------------
def template_tokens(model: str, image_size: int) -> int:
    """Tokens of the bench's prompt that are neither its text nor its image, with this model's
    tokenizer (the tiny BPE's 27, not Qwen's 21)."""
    if model == "tiny":
        tok, ip = build_tiny_tokenizer(), image_processor_for()
    else:
        from transformers import AutoTokenizer
        tok, ip = AutoTokenizer.from_pretrained(model), image_processor_for(model)
    msgs = make_messages(prompt_text(tok, 64, 0), noise_image(image_size, 0))
    enc = encode(tok, ip, msgs, add_generation_prompt=True)
    return len(enc.input_ids) - 64 - int(enc.image_grid_thw.prod()) // 4


def measured_and_estimated(model, out, *, gc: bool, G: int, image_size: int, new: int):
    flags = ["--num_generations", str(G), "--image_size", str(image_size), "--max_new_tokens",
             str(new), "--gradient_checkpointing" if gc else "--no-gradient_checkpointing"]
    res = run_script("common.perf.bench", "--model", model, "--workload", "image", *flags,
                     "--steps", "1", "--warmup", "1", "--fastgen", "--no-limits", "--threads", "1",
                     "--exact_rss", "--out", str(out), timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    ours = json.loads(res.stdout.strip().splitlines()[-1])["ours"]
    if ours["peak_increment_kind"] != "rss":
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs)")
    args = estimate.Args(model=model, num_generations=G, micro_batch_size=0, max_new_tokens=new,
                         image_size=image_size, template_tokens=template_tokens(model, image_size),
                         load_in_4bit=False, gradient_checkpointing=gc, dtype="float32", beta=0.0,
                         ragged=False)
    e = estimate.estimate(args)
    return ours["peak_increment_gb"] * estimate.GB, e


def check(measured, e, phase):
    """Within the tolerance, and the phase that sets the estimate is the one named."""
    print(f"measured {measured / 2**20:.1f} MB, estimated {e['step'] / 2**20:.1f} MB "
          f"({e['step'] / measured - 1:+.1%}), set by {phase}")
    assert e["step"] == pytest.approx(measured, rel=TOLERANCE), (measured / 2**20, {
        k: round(v / 2**20, 1) for k, v in e.items() if isinstance(v, int) and v > 2**20})
    assert max(("train", "generation", "nograd_pass"), key=e.get) == phase


@pytest.mark.parametrize("gc", [False, True], ids=["no_gc", "gc"])
def test_estimate_matches_the_measured_tiny_step(tmp_path, gc):
    """Tiny preset, G = 8, one 448x448 image, 512 new tokens (N = 8 x 859 tokens): the training
    micro-batch sets the peak (its activations, + the 8 rows' pixel values)."""
    measured, e = measured_and_estimated("tiny", tmp_path, gc=gc, G=8, image_size=448, new=512)
    check(measured, e, "train")


@pytest.mark.slow
def test_estimate_matches_measured_steps_of_a_reduced_3b(tmp_path):
    """Random-weight Qwen2.5-VL-3B at full width (hidden 2048, intermediate 11008, 16/2 heads),
    cut to 2 layers (+ 2 ViT blocks), one 224x224 image, 256 new tokens:
      vocab 1,024, G = 4, no checkpointing: the training micro-batch sets the peak (~0.85 GB);
      vocab 1,024, G = 8, checkpointing: training again (its recomputed layer), over generation;
      vocab 1,024, G = 4, checkpointing: generation sets it: the LoRA-merged copies of the
        linears (float32 base) and peft's B A buffers while merging;
      full vocab 151,936, 1 layer, G = 4, 128 new tokens, checkpointing: the log-prob chunk's
        backward (5 x 512 x 151,936 fp32) sets it.
    10-30 minutes on a shared 2-core CPU (27 min when last run, all four within 3 %)."""
    folders = {}
    for name, extra in (("l2", ["--num_layers", "2", "--vocab_size", "1024"]),
                        ("l1v", ["--num_layers", "1"])):
        folders[name] = str(tmp_path / name)
        res = run_script("common.perf.bench", "--model", "qwen2.5-vl-3b", "--random-weights",
                         *extra, "--save_model", folders[name], timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
    runs = [("l2", False, 4, 256, "train"), ("l2", True, 8, 256, "train"),
            ("l2", True, 4, 256, "generation"), ("l1v", True, 4, 128, "train")]
    for name, gc, G, new, phase in runs:
        measured, e = measured_and_estimated(folders[name], tmp_path / "run", gc=gc, G=G,
                                             image_size=224, new=new)
        print(f"{name} gc={gc} G={G}:", end=" ")
        check(measured, e, phase)
    assert e["logprob_chunk"] > 2 * e["generation"]           # the last run is the chunk's
