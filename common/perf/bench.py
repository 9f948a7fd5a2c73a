"""GRPO benchmark: one GRPO step (rollout + log-probs + update) of this project beside TRL's, on
three workloads, each figure set against the machine's measured limit.

    python -m common.perf.bench --model tiny --steps 1 --warmup 0                       # plumbing,
    seconds
    python -m common.perf.bench --model smollm2 --num_generations 8 --max_new_tokens 32 --beta 0.04
    \\
        --vs-trl --threads 1 --steps 5                                             # the fair
        comparison, CPU
    python -m common.perf.bench --model tiny --workload image --image_size 448          # one prompt
    image
    python -m common.perf.bench --model tiny --workload agent --image_size 112          # two tool
    turns (text, crop)
    python -m common.perf.bench --model tiny --workload agent --fastgen                 # the same,
    KV kept across turns
    # GPU (the DESIGN budgets): NF4 + LoRA + gradient checkpointing, G = 8, one 448x448 image, 512
    new tokens
    python -m common.perf.bench --model qwen2.5-vl-3b --random-weights --load_in_4bit
    --gradient_checkpointing \\
        --workload image --num_generations 8 --image_size 448 --max_new_tokens 512 --steps 3 --beta
        0.04

Workloads (--workload):
  text   single turn, a --prompt_tokens user text.
  image  single turn, the same text after one --image_size noise image.
  agent  the image prompt, then two tool turns and an answer: each assistant turn samples
         --max_new_tokens tokens, then the bench appends a scripted action (a random-weight model
         never calls a tool by itself): turn 1 `<text_search>`, answered with --observation_tokens
         of text; turn 2 a `<tool_call>` crop, answered with the top-left quarter of the image as a
         new image; turn 3 `<answer>`. Observations are mask 0, as in every agent script. On a
         text-only model (smollm2) there is no prompt image and both tool turns are answered
         with text (the multi-turn cache measured where a real model's weights dominate).
TRL (--vs-trl) runs `trl.GRPOTrainer` on a second copy of the same model. Fair by construction:
  * every completion is exactly --max_new_tokens long on both sides (end-of-turn suppressed), and
    the bench checks the generated token counts step by step and says so when they differ;
  * the same KL estimator: k3 without TRL's importance-sampling correction
    (`use_bias_correction_kl=False`), the same loss type, clip, beta, temperature, AdamW
    (torch's, lr, no weight decay, grad-norm clip 1), LoRA (r, alpha, targets), seed;
  * TRL's fused log-prob head scores only completion positions on CUDA/XPU but every prompt
    position elsewhere (`trl.trainer.utils`: `compact = _use_triton(device)`). Variant `trl`
    (the headline) makes it score only completion positions on a CPU too, as it does on a GPU;
    `trl_shipped` runs it as shipped. --trl_variant both runs the two;
  * each side runs in its own process (its own threads and its own peak memory), and the steps
    alternate between processes (ours, TRL, TRL, ours, ...), so a drift of the machine's speed
    hits both; >= 5 measured steps are reported as min / median / max.
  TRL cannot run the agent workload (its tool loop returns text to the model, not an image
  observation spliced as a user turn): that workload is ours only. With an image, TRL needs
  Qwen2_5_VLProcessor, which needs torchvision; without it the TRL side is skipped and says why.
Splits: generate = sampling; logprob = no-grad passes (reference when beta != 0, old log-probs when
mu > 1); backward = the forward with grad + backward + optimizer step; other = the rest.
Limits (--limits): the bench measures the memory bandwidth (a large tensor copy) and the peak
matmul FLOP/s of this device with the same threads, then reports decode tokens/s as a fraction
of the bandwidth bound (B x bandwidth / bytes of weights read per decode step) and the
log-prob and backward phases as a fraction of the peak FLOP/s (useful model FLOPs: 2 N per
token forward, 2 N more for the backward's activation gradients; recomputation not counted).
On CUDA the vendor HBM figure is printed beside the measured one.
--random-weights builds Qwen2.5-VL-3B/7B-Instruct from the published config values with random
weights (the tokenizer is the tiny preset's, the embedding at the real vocab unless --vocab_size):
the compute and memory are the real model's, the sampled text is noise. --num_layers N keeps N
LLM and N ViT blocks (a CPU smoke). --save_model DIR writes such a model and exits.
--fastgen runs ours as the core does by default (run_rollouts' CachedGenerator from
common/generate.py: shared-prefix KV cache for the G samples, KV cache kept across agent turns, LoRA
merged during decode when the base is not quantised; train_grpo's vision tower once per distinct
image); without it ours runs the plain path (one HF generate per turn, `generate=generate_ids`,
vision_once=False), the "before" of a before/after.
On a busy CPU pass --threads 1: two OpenMP threads on a contended 2-core box made decoding ~60x
slower.

Size: about 1,000 lines because it runs our GRPO step and TRL's side by side on the same
workloads (text, image, agent) with fair settings; a tool, imported by no script."""
from __future__ import annotations

import ctypes
import importlib.util
import inspect
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from common.cli import build_parser, given_flags
from common.errors import UserError
from common.generate import CachedGenerator, generate_ids
from common.grpo import GRPOConfig, train_grpo
from common.logprobs import unwrap
from common.models import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    LORA_TARGETS,
    build_tiny_tokenizer,
    image_processor_for,
    load_policy,
    resolve_gradient_checkpointing,
)
from common.perf import estimate
from common.perf.estimate import QWEN25VL, QWEN25VL_VISION, random_size
from common.rewards import per_rollout
from common.rollout import run_rollouts
from common.runlog import read_jsonl
from common.tools import Grammar

WORKLOADS = ("text", "image", "agent")
SIDES = ("ours", "trl", "trl_shipped")


@dataclass
class Args:
    model: str = "tiny"
    """preset (tiny, smollm2), hub id or folder; qwen2.5-vl-3b / qwen2.5-vl-7b with
    --random-weights"""
    random_weights: bool = False
    """build Qwen2.5-VL-3B/7B-Instruct from the published config with random weights (no hub)"""
    num_layers: int = 0
    """random weights only: keep this many LLM and ViT blocks (0 = the published depth)"""
    vocab_size: int = 0
    """random weights only: vocabulary size (0 = the published 151,936 / 152,064; a CPU smoke uses
    ~1k)"""
    save_model: str = ""
    """random weights only: write the model (+ tokenizer, image processor) to this folder and
    exit"""
    workload: str = ""
    """text, image or agent (default: image when --image_size > 0, else text)"""
    num_generations: int = 4
    """G: completions per prompt"""
    prompts_per_step: int = 1
    """prompts per step (B = prompts_per_step x G)"""
    image_size: int = 0
    """side of the noise image in the prompt (image and agent workloads; agent default 112)"""
    prompt_tokens: int = 64
    """tokens of user text in the prompt (the chat template adds ~20)"""
    max_new_tokens: int = 32
    """tokens per completion (per assistant turn for agent); forced to exactly this length"""
    observation_tokens: int = 48
    """agent: tokens of the text-search observation"""
    steps: int = 5
    """measured steps (per side)"""
    warmup: int = 1
    """unmeasured steps first (per side)"""
    beta: float = 0.0
    """KL coefficient (0 = no reference pass, TRL's default)"""
    loss_type: str = "grpo"
    """grpo, bnpo, dr_grpo or dapo"""
    learning_rate: float = 1e-5
    """AdamW learning rate"""
    micro_batch_size: int = 0
    """sequences per forward/backward (0 = the whole batch, as TRL's per_device_train_batch_size =
    B)"""
    logprob_chunk_tokens: int = 1024
    """common.grpo: (rows x positions) of logits per log-prob chunk"""
    load_in_4bit: bool = False
    """NF4 base weights (bitsandbytes)"""
    lora: bool = True
    """LoRA adapter (r, alpha below) on the LLM projections"""
    lora_r: int = 8
    """LoRA rank"""
    lora_alpha: int = 16
    """LoRA alpha"""
    gradient_checkpointing: bool | None = None
    """activation checkpointing in the decoder (none = auto: on for CUDA, off on a CPU)"""
    dtype: str = "auto"
    """compute dtype: auto (bfloat16 on a GPU with native bf16, float32 on a CPU), bfloat16,
    float32"""
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    """image processor cap per image (none = the checkpoint's own)"""
    min_pixels: int | None = DEFAULT_MIN_PIXELS
    """image processor floor per image (none = the checkpoint's own)"""
    exact_rss: bool = False
    """CPU memory check: allocations >= 64 KiB come straight from the OS (mallopt), so the peak
    RSS tracks live tensors instead of what malloc keeps; slower"""
    estimate: bool = False
    """print the memory estimate for these settings (common.perf.estimate) and exit: no weights"""
    vs_trl: bool = False
    """also run TRL's GRPOTrainer on the same work (its own process, alternating steps)"""
    trl_variant: str = "trl"
    """trl (completion positions only, the fair one), trl_shipped (as shipped: every position on a
    CPU) or both"""
    fastgen: bool = False
    """ours as the core's default (common/generate.py: shared-prefix KV, KV across turns, merged
    LoRA in
    decode, vision tower once per image); off: the plain path, the "before" of a before/after"""
    limits: bool = True
    """measure memory bandwidth and peak FLOP/s and report each figure as a fraction of its bound"""
    threads: int = 0
    """torch CPU threads per side (0 = torch's default)"""
    seed: int = 0
    """seed for weights, LoRA init, prompt text, image and sampling"""
    out: str = "runs/bench"
    """output folder (ours/ and trl/ run folders, result.json)"""
    debug: bool = False
    """show the full traceback of an error"""


# ---------------------------------------------------------------------------------------------
# random-weight Qwen2.5-VL at published sizes (the table: common/perf/estimate.py)
# ---------------------------------------------------------------------------------------------
def qwen25vl_config(size: str, tok, num_layers: int = 0, vocab_size: int = 0):
    from transformers import Qwen2_5_VLConfig
    text = dict(QWEN25VL[size], rms_norm_eps=1e-6, max_position_embeddings=128000,
                hidden_act="silu",
                rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    vision = dict(QWEN25VL_VISION, out_hidden_size=text["hidden_size"])
    if vocab_size:  # a CPU smoke: the tiny tokenizer's ~1k ids instead of 152k rows of embedding
        text["vocab_size"] = max(vocab_size, len(tok))
    # a truncated copy for a CPU smoke: N LLM blocks, N ViT blocks (last one full attention)
    if num_layers:
        text["num_hidden_layers"] = num_layers
        vision["depth"] = num_layers
        vision["fullatt_block_indexes"] = sorted({i for i in vision["fullatt_block_indexes"]
                                                  if i < num_layers}
                                                 | {num_layers - 1})
    ids = tok.convert_tokens_to_ids  # the tiny tokenizer's ids for Qwen's special tokens
    text.update(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            image_token_id=ids("<|image_pad|>"),
                            video_token_id=ids("<|video_pad|>"),
                            vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"),
                            tie_word_embeddings=text["tie_word_embeddings"])


def build_random_folder(size: str, num_layers: int, seed: int, folder: str,
                        vocab_size: int = 0) -> str:
    """Random Qwen2.5-VL-<size> (+ tiny tokenizer, Qwen image processor) saved to `folder`, so
    `load_policy(folder, ...)` loads it like any checkpoint (NF4 quantises while loading)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    tok = build_tiny_tokenizer()
    cfg = qwen25vl_config(size, tok, num_layers, vocab_size)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(dev):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)  # random init
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    n = sum(p.numel() for p in model.parameters())
    print(f"[bench] random Qwen2.5-VL-{size.upper()} ({n / 1e9:.2f}B params, {dtype}) -> {folder}")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    image_processor_for().save_pretrained(folder)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return folder


# ---------------------------------------------------------------------------------------------
# the work: prompt, forced-length generation, scripted agent turns, reward
# ---------------------------------------------------------------------------------------------
WORDS = ("the a of to and in is that for it as was with be by on not he this are or his from at "
         "which "
         "but have an they you were her she there been one all we their has would when if so no "
         "what up "
         "out who them some could into time than only other new then do also now its two like more "
         "image city river answer search tile question founded capital").split()


def prompt_text(tok, n_tokens: int, seed: int) -> str:
    """User text of exactly n_tokens tokens (seeded words, cut at a token boundary)."""
    rng = random.Random(seed)
    words = []
    while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < n_tokens:
        words += [rng.choice(WORDS) for _ in range(max(8, n_tokens // 2))]
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"][:n_tokens]
    return tok.decode(ids)


def noise_image(size: int, seed: int):
    from PIL import Image
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)  # (H, W, 3)
    return Image.fromarray(arr)


def reward_text(text: str) -> float:
    """Cheap, identical on both sides, not constant within a group: distinct words / 10."""
    return len(set(text.split())) / 10.0


def _forced_kw():
    """generate_ids takes min_new_tokens (forced length) in newer cores; else the generation
    config."""
    return "min_new_tokens" in inspect.signature(generate_ids).parameters


def forced_generate(policy, seqs, *, max_new_tokens, **kw):
    """common.generate.generate_ids with end-of-turn suppressed until the budget, so every
    completion has exactly max_new_tokens tokens (the same work as TRL's side)."""
    n = max_new_tokens if isinstance(max_new_tokens, int) else min(max_new_tokens)
    if _forced_kw():
        return generate_ids(policy, seqs, max_new_tokens=max_new_tokens, min_new_tokens=n, **kw)
    if not getattr(forced_generate, "warned", False):
        forced_generate.warned = True   # the core pins min_new_tokens=0: nothing forces the length
        print("[bench] warning: common.generate.generate_ids pins min_new_tokens=0 and takes no "
              "min_new_tokens, so completions are not forced to the budget; the per-step token "
              "check "
              "against TRL says whether the work still matched")
    gc = unwrap(policy.model).generation_config
    old = gc.min_new_tokens
    gc.min_new_tokens = n
    try:
        return generate_ids(policy, seqs, max_new_tokens=max_new_tokens, **kw)
    finally:
        gc.min_new_tokens = old


class ScriptedAgent:
    """A `generate=` for run_rollouts that samples a forced-length turn with `inner`, then appends
    this turn's scripted action: `<text_search>`, a crop `<tool_call>`, `<answer>` (a random-weight
    model never calls a tool itself). A sampled token that holds '<' or '>' (a stray tag would
    turn the action into a parse error and change the work) is replaced by a space token before
    the turn is handed back. One instance per rollout batch: call k is turn k."""

    _bad: dict = {}

    def __init__(self, tok, inner, image_size: int):
        half = max(28, image_size // 2)
        self.tails = [tok(s, add_special_tokens=False)["input_ids"] for s in (
            " <text_search>capital city river</text_search>",
            ' <tool_call>{"name": "crop", "arguments": {"bbox_2d": [0, 0, %d, '
            '%d]}}</tool_call>' % (half, half),
            " <answer>Paris</answer>")]
        key = id(tok)
        if key not in self._bad:
            self._bad[key] = {i for i in range(len(tok)) if any(c in tok.decode([i]) for c in "<>")}
        self.bad, self.space = self._bad[key], tok(" ", add_special_tokens=False)["input_ids"][0]
        self.inner, self.calls = inner, 0

    def __call__(self, policy, seqs, *, max_new_tokens, stop_strings=None, return_logprobs=False,
                 **kw):
        tail = self.tails[min(self.calls, len(self.tails) - 1)]
        self.calls += 1
        # the tail is appended after sampling, so sample budget - len(tail); stop strings off so a
        # sampled closing tag cannot end a turn early (the work stays identical across runs)
        budget = max_new_tokens if isinstance(max_new_tokens, int) else min(max_new_tokens)
        n = max(1, budget - len(tail))
        out = self.inner(policy, seqs, max_new_tokens=n, stop_strings=None, **kw)
        out = out[0] if isinstance(out, tuple) else out
        return [[self.space if i in self.bad else i for i in ids] + tail for ids in out]


def agent_tools(tok, observation_tokens: int, seed: int):
    obs = prompt_text(tok, observation_tokens, seed + 7)

    def text_search(args, rollout):
        return obs, None

    def crop(args, rollout):
        if not rollout.images:   # a text-only model: the crop turn is answered with text
            return obs, None
        im = rollout.images[0]
        return "Cropped region.", im.crop((0, 0, max(28, im.width // 2), max(28, im.height // 2)))
    return {"text_search": text_search, "crop": crop}


AGENT_GRAMMAR = Grammar(tags={"text_search": "text_search", "tool_call": "tool_call",
                              "answer": "answer"},
                        tool_names={"crop": "crop"})


# ---------------------------------------------------------------------------------------------
# the machine's limits, measured
# ---------------------------------------------------------------------------------------------
def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_bandwidth(device: str, mbytes: int = 256, reps: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written over the best time)."""
    n = mbytes * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        b.copy_(a)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def measure_flops(device: str, dtype: torch.dtype, n: int = 1024, reps: int = 3) -> float:
    """FLOP/s of an n x n x n matmul (2 n^3 FLOPs), best of reps."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def model_sizes(policy) -> dict:
    """Parameter counts the bounds need: LLM body (no embedding, no ViT), lm_head, ViT; and the
    bytes one decode step reads (LLM weights as stored, NF4 packed, + lm_head)."""
    hf = unwrap(policy.model)
    embed, head = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
    seen, body, vit, dec_bytes = set(), 0, 0, 0
    for name, p in hf.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if "visual" in name:
            vit += p.numel()
            continue
        if p is embed and head is not embed:  # an untied input embedding: one row per token
            continue
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)   # NF4: two weights per byte
        if p is not head and p is not embed:
            body += n
        dec_bytes += p.numel() * p.element_size()
    return {"body_params": body, "head_params": head.numel(), "vit_params": vit,
            "decode_bytes": dec_bytes}


# vendor peak
HBM_GBPS = {"H100": 3350, "H200": 4800, "A100": 2039, "L40S": 864, "RTX 4090": 1008, "T4": 320}


# ---------------------------------------------------------------------------------------------
# one step's figures; min / median / max over the measured steps
# ---------------------------------------------------------------------------------------------
def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    # KB on Linux: this process only
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _proc_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def exact_rss() -> bool:
    """Make this process's peak RSS track its live tensors: glibc serves every allocation of
    64 KiB or more by mmap and gives it back on free (no arena keeps freed tensors), and freed
    heap memory is trimmed. Slower; for the CPU memory check only. False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 64 * 1024) == 1 and libc.mallopt(-1, 0) == 1   # M_MMAP_THRESHOLD,
        libc.malloc_trim(0)                                                  # M_TRIM_THRESHOLD
        return ok
    except (OSError, AttributeError):
        return False


class MemoryMeter:
    """The peak memory of a stretch of this process over the memory at its start: on CUDA
    max_memory_allocated over memory_allocated; on a CPU the peak RSS (VmHWM, reset at the start
    through /proc/self/clear_refs) over the RSS at the start (the loaded model, the optimiser
    state of earlier steps). `kind` says which; None where the peak cannot be reset."""

    def __init__(self):
        self.base, self.kind = None, None

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base, self.kind = torch.cuda.memory_allocated(), "cuda_allocated"
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                   # VmHWM := VmRSS
        except OSError:
            self.base, self.kind = None, None
            return
        rss = _proc_kb("VmRSS")
        self.base, self.kind = (rss * 1024, "rss") if rss is not None else (None, None)

    def increment_gb(self) -> float | None:
        if self.base is None:
            return None
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**30
        return (_proc_kb("VmHWM") * 1024 - self.base) / 2**30


SPLITS = ("step_s", "generate_s", "logprob_s", "backward_s", "other_s")


def summarise(rows: list[dict], warmup: int) -> dict:
    """Median (and min, max) of each split over the measured steps; tokens/s over generation
    time."""
    m = rows[warmup:] or rows
    out = {}
    for k in SPLITS:
        v = [r[k] for r in m]
        out[k] = statistics.median(v)
        out[k.replace("_s", "_min_s")], out[k.replace("_s", "_max_s")] = min(v), max(v)
    out["gen_tokens"] = statistics.median(r["gen_tokens"] for r in m)
    out["gen_tokens_per_s"] = statistics.median(r["gen_tokens"] / max(r["generate_s"], 1e-9)
                                                for r in m)
    for k in ("train_tokens", "prefill_tokens"):
        if k in m[0]:
            out[k] = statistics.median(r[k] for r in m)
    out["steps"] = len(m)
    return out


class Sync:
    """The child's side of the step-by-step alternation: wait for 'go', report each step."""

    def __init__(self, conn):
        self.conn = conn

    def go(self):
        if self.conn is not None and self.conn.recv() != "go":
            raise SystemExit(0)

    def report(self, row: dict):
        if self.conn is not None:
            self.conn.send(("row", row))


# ---------------------------------------------------------------------------------------------
# ours: common.grpo.train_grpo (public functions only)
# ---------------------------------------------------------------------------------------------
def make_messages(text, image):
    if image is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user",
             "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def make_generate(policy, args):
    """The generator of one rollout batch: plain (common.rollout) or common.generate, forced
    length."""
    if args.fastgen:
        gen = CachedGenerator(force_length=True)
    else:
        gen = forced_generate
    if args.workload == "agent":
        return ScriptedAgent(policy.tokenizer, gen, args.image_size)
    return gen


def run_ours(policy, args, text, image, out_dir, sync: Sync) -> list[dict]:
    G, total = args.num_generations, args.warmup + args.steps
    cfg = GRPOConfig(learning_rate=args.learning_rate, num_generations=G,
                     prompts_per_step=args.prompts_per_step,
                     max_steps=total, beta=args.beta, loss_type=args.loss_type,
                     max_completion_length=args.max_new_tokens
                     * (3 if args.workload == "agent" else 1),
                     micro_batch_size=args.micro_batch_size or G * args.prompts_per_step,
                     logprob_chunk_tokens=args.logprob_chunk_tokens, vision_once=args.fastgen,
                     seed=args.seed)
    dataset = [{"id": i} for i in range(args.prompts_per_step * total)]
    agent = args.workload == "agent"
    tools = agent_tools(policy.tokenizer, args.observation_tokens, args.seed) if agent else None

    def rollout_fn(policy, examples, cfg):
        return run_rollouts(policy, examples, num_generations=cfg.num_generations,
                                        make_messages=lambda ex: make_messages(text, image),
                                        tools=tools, grammar=AGENT_GRAMMAR,
                                        max_turns=3 if agent else 1,
                                        max_new_tokens=args.max_new_tokens,
                                        max_total_tokens=1 << 30,
                                        temperature=cfg.temperature,
                                        generate=make_generate(policy, args))

    reward_fn = per_rollout(lambda r, ex: {"reward": reward_text(r.generated_text())})
    rows, clock, meter = [], {"t": 0.0}, MemoryMeter()

    def on_step(step, rollouts, terms):
        sync_dev()
        t_end = time.perf_counter()
        # train_grpo's own split timers
        m = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))[-1]
        row = dict(step_s=t_end - clock["t"], generate_s=m["time/generate"],
                   logprob_s=m["time/logprob"],
                   backward_s=m["time/backward"], gen_tokens=sum(r.n_generated for r in rollouts),
                   train_tokens=sum(len(r.prompt_ids) + len(r.ids) for r in rollouts),
                   n_images=sum(len(r.images) for r in rollouts))
        row["other_s"] = row["step_s"] - row["generate_s"] - row["logprob_s"] - row["backward_s"]
        if step + 1 == total:   # the measured steps' peak over the memory before them
            row["peak_increment_gb"], row["peak_increment_kind"] = meter.increment_gb(), meter.kind
        rows.append(row)
        sync.report(row)
        if step + 1 == args.warmup:
            meter.start()       # resets CUDA's peak statistics too
        if step + 1 < total:
            sync.go()
        clock["t"] = time.perf_counter()

    sync.go()
    if args.warmup == 0:
        meter.start()
    clock["t"] = time.perf_counter()
    train_grpo(policy, dataset, rollout_fn, reward_fn, cfg, out_dir, on_step=on_step)
    return rows


def sync_dev():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# TRL: trl.GRPOTrainer on a copy of the same model, in its own process
# ---------------------------------------------------------------------------------------------
def trl_processor(policy):
    """Qwen2_5_VLProcessor from our tokenizer + image processor (TRL needs it for images)."""
    try:
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
            Qwen2VLVideoProcessor,
        )
        return Qwen2_5_VLProcessor(image_processor=policy.image_processor,
                                   tokenizer=policy.tokenizer,
                                   video_processor=Qwen2VLVideoProcessor(),
                                   chat_template=policy.tokenizer.chat_template)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"TRL needs a Qwen2_5_VLProcessor for image prompts, which cannot be built "
                        f"here "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:100]}; it needs "
                        f"torchvision)") from e


def trl_skip_reason(args) -> str | None:
    """Why TRL cannot do this workload here, or None."""
    if args.workload == "agent":
        return ("TRL's GRPOTrainer tool loop returns text to the model; it cannot splice an image "
                "observation (the crop) as a user turn, so the agent workload is ours only")
    if args.workload == "image":
        if importlib.util.find_spec("torchvision") is None:
            return ("TRL needs Qwen2_5_VLProcessor for an image prompt, which needs torchvision "
                    "(not installed)")
    return None


def make_trl_trainer(args, text, image, out_dir, compact: bool):
    import trl.trainer.utils as trl_utils
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer
    # score only completion positions on any device, as TRL does on CUDA (the fair variant)
    if compact:
        # (TRL's module, not ours; its CPU kernels stay)
        trl_utils._use_triton = lambda device: True
    # TRL adds LoRA and checkpointing
    policy = load_model(args, lora=False, gradient_checkpointing=False)
    hq = getattr(policy.model, "hf_quantizer", None)
    if hq is not None and str(getattr(hq.quantization_config.quant_method, "value", "")) == "gguf":
        # smollm2: GGUF is only the file format (weights dequantized at load),
        hq.remove_quantization_config(policy.model)
        # but transformers' Trainer refuses any model marked GGUF-quantized
    cuda = torch.cuda.is_available()
    B, total = args.num_generations * args.prompts_per_step, args.warmup + args.steps
    cfg = TRLConfig(output_dir=out_dir, per_device_train_batch_size=B,
                    gradient_accumulation_steps=1,
                    num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
                    max_steps=total, learning_rate=args.learning_rate, lr_scheduler_type="constant",
                    optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, beta=args.beta,
                    loss_type=args.loss_type, use_bias_correction_kl=False,
                    epsilon=0.2, scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0,
                    generation_kwargs={"min_new_tokens": args.max_new_tokens},  # same forced length
                    gradient_checkpointing=args.gradient_checkpointing,
                    gradient_checkpointing_kwargs={"use_reentrant": False},
                    bf16=cuda, use_cpu=not cuda, report_to="none", save_strategy="no",
                    logging_steps=10**6,
                    disable_tqdm=True, shuffle_dataset=False, seed=args.seed, log_completions=False)
    row = {"prompt": [{"role": "user", "content": text}]}
    if image is not None:
        row["image"] = image
    dataset = Dataset.from_list([row] * (args.prompts_per_step * total))
    processing = trl_processor(policy) if image is not None else policy.tokenizer
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      task_type="CAUSAL_LM",
                      target_modules=(r".*language_model.*\.(" + "|".join(LORA_TARGETS) + r")")
                      if policy.is_vlm
                      else list(LORA_TARGETS)) if args.lora else None
    counts = []

    def reward(completions, completion_ids, **kw):
        counts.append(sum(len(c) for c in completion_ids))
        return [reward_text(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    trainer = GRPOTrainer(model=policy.model, reward_funcs=reward, args=cfg, train_dataset=dataset,
                          processing_class=processing, peft_config=lora)
    return trainer, counts, policy


def run_trl(trainer, counts, args, sync: Sync) -> list[dict]:
    from transformers import TrainerCallback
    acc = {"gen": 0.0, "lp": 0.0, "prep": 0.0}

    def timed(key, fn, only_no_grad=False):
        def wrapper(*a, **k):
            count = not (only_no_grad and torch.is_grad_enabled())
            t = time.perf_counter()
            out = fn(*a, **k)
            if count:
                acc[key] += time.perf_counter() - t
            return out
        return wrapper

    trainer._generate = timed("gen", trainer._generate)
    trainer._generate_and_score_completions = timed("prep", trainer._generate_and_score_completions)
    lp_fn = trainer._get_per_token_logps_and_entropies
    trainer._get_per_token_logps_and_entropies = timed("lp", lp_fn, True)
    rows, clock = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync.go()
            sync_dev()
            acc.update(gen=0.0, lp=0.0, prep=0.0)
            clock["t"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync_dev()
            step_s = time.perf_counter() - clock["t"]
            row = dict(step_s=step_s, generate_s=acc["gen"], logprob_s=acc["lp"],
                       backward_s=step_s - acc["prep"], gen_tokens=counts[-1])
            row["other_s"] = step_s - row["generate_s"] - row["logprob_s"] - row["backward_s"]
            rows.append(row)
            sync.report(row)
            if len(rows) == args.warmup and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    trainer.add_callback(Clock())
    trainer.train()
    return rows


# ---------------------------------------------------------------------------------------------
# one side, in this process or a child
# ---------------------------------------------------------------------------------------------
_RANDOM_FOLDERS: dict = {}


def load_model(args, lora: bool, gradient_checkpointing: bool):
    name = args.model
    size = random_size(name)
    if args.random_weights or name.lower().endswith("-random"):
        if size is None:
            raise UserError(f"--random-weights builds qwen2.5-vl-3b or qwen2.5-vl-7b, not "
                            f"{name!r}.")
        if size not in _RANDOM_FOLDERS:
            _RANDOM_FOLDERS[size] = tempfile.TemporaryDirectory(prefix=f"bench-qwen25vl-{size}-")
            build_random_folder(size, args.num_layers, args.seed, _RANDOM_FOLDERS[size].name,
                                args.vocab_size)
        name = _RANDOM_FOLDERS[size].name
    elif args.num_layers or args.vocab_size:
        raise UserError("--num_layers and --vocab_size only apply to --random-weights models.")
    try:
        return load_policy(name, load_in_4bit=args.load_in_4bit, lora=lora, lora_r=args.lora_r,
                           lora_alpha=args.lora_alpha,
                           gradient_checkpointing=gradient_checkpointing, dtype=args.dtype,
                           max_pixels=args.max_pixels, min_pixels=args.min_pixels,
                           seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e).splitlines()[0]) from e


def prompt_inputs(policy, args):
    text = prompt_text(policy.tokenizer, args.prompt_tokens, args.seed)
    image = noise_image(args.image_size,
                        args.seed) if args.workload != "text" and policy.is_vlm else None
    return text, image


def run_side(args, side: str, conn=None) -> dict:
    """Load, run `side` for warmup + steps, return {"rows", "info"} (peak memory of this
    process)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.exact_rss and not torch.cuda.is_available() and not exact_rss():
        print("[bench] --exact_rss: mallopt is not available here (not glibc); the peak RSS "
              "includes what malloc keeps")
    random.seed(args.seed)
    sync = Sync(conn)
    out_dir = os.path.join(args.out, side)
    if side == "ours":
        policy = load_model(args, lora=args.lora,
                            gradient_checkpointing=args.gradient_checkpointing)
        if args.workload == "image" and not policy.is_vlm:
            raise UserError(f"the image workload needs a vision-language model; {args.model} is "
                            f"text-only.")
        if args.workload == "agent" and not policy.is_vlm:
            print(f"[bench] {args.model} is text-only: no prompt image, and the crop turn is "
                  f"answered with "
                  f"the same {args.observation_tokens} tokens of text as the search turn")
        text, image = prompt_inputs(policy, args)
        if conn is not None:
            conn.send(("ready", {}))
        rows = run_ours(policy, args, text, image, out_dir, sync)
    else:
        # for the prompt text only
        tok_policy = load_model(args, lora=False, gradient_checkpointing=False)
        text, image = prompt_inputs(tok_policy, args)
        del tok_policy
        trainer, counts, policy = make_trl_trainer(args, text, image, out_dir,
                                                   compact=side == "trl")
        if conn is not None:
            conn.send(("ready", {}))
        rows = run_trl(trainer, counts, args, sync)
    info = {"peak_gb": peak_memory_gb(),
            "peak_kind": "cuda_max_allocated" if torch.cuda.is_available()
            else "peak_rss_this_process", "threads": torch.get_num_threads(), **model_sizes(policy)}
    if side == "ours":
        info.update(peak_increment_gb=rows[-1].get("peak_increment_gb"),
                    peak_increment_kind=rows[-1].get("peak_increment_kind"))
    return {"rows": rows, "info": info}


def _child(args_dict, side, conn):
    try:
        res = run_side(Args(**args_dict), side, conn)
        conn.send(("done", res["info"]))
    except BaseException as e:  # noqa: BLE001 - hand any failure to the parent as one sentence
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        conn.send(("error", f"{side}: {type(e).__name__}: {msg}"))
    finally:
        conn.close()


def run_alternating(args, sides: list[str]) -> dict:
    """Each side in its own (spawned) process; steps alternate ABBA... so a drift hits both."""
    ctx = mp.get_context("spawn")
    procs, conns = {}, {}

    def recv(side, want):
        kind, payload = conns[side].recv()
        if kind == "error":
            raise RuntimeError(payload)
        if kind != want:
            raise RuntimeError(f"{side}: expected {want}, got {kind}")
        return payload

    try:
        # started and loaded one after the other: each load has the CPU to itself
        for side in sides:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child, args=(asdict(args), side, child), daemon=True)
            p.start()
            procs[side], conns[side] = p, parent
            recv(side, "ready")
        rows = {s: [] for s in sides}
        for step in range(args.warmup + args.steps):
            order = sides if step % 2 == 0 else sides[::-1]
            for side in order:
                conns[side].send("go")
                rows[side].append(recv(side, "row"))
        infos = {s: recv(s, "done") for s in sides}
    finally:
        for p in procs.values():
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    return {s: {"rows": rows[s], "info": infos[s]} for s in sides}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def fmt(name: str, s: dict, info: dict) -> str:
    return (f"{name:11s} step {s['step_s']:7.2f}s [{s['step_min_s']:.2f}-{s['step_max_s']:.2f}] = "
            f"generate "
            f"{s['generate_s']:6.2f} + logprob/ref {s['logprob_s']:6.2f} + backward "
            f"{s['backward_s']:6.2f} + other "
            f"{s['other_s']:5.2f} | {s['gen_tokens_per_s']:7.1f} gen tok/s | peak "
            f"{info['peak_gb']:.2f} GB"
            + (f" (+{info['peak_increment_gb']:.3f} GB over the start of the measured steps)"
               if info.get("peak_increment_gb") is not None else "")
            + f", {info['threads']} threads")


def limits(args, res: dict, s: dict, info: dict) -> dict:
    """Bandwidth and FLOP/s bounds for one side's median step."""
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    out = {"bandwidth_gbps": measure_bandwidth(dev, 1024 if cuda else 256),
           "peak_flops": measure_flops(dev, torch.bfloat16 if cuda else torch.float32,
                                       8192 if cuda else 1024)}
    if cuda:
        out["hbm_vendor_gbps"] = next((v for k, v in HBM_GBPS.items() if k in res["device"]), None)
    B = args.num_generations * args.prompts_per_step
    out["decode_bound_tok_s"] = B * out["bandwidth_gbps"] * 1e9 / info["decode_bytes"]
    out["decode_fraction"] = s["gen_tokens_per_s"] / out["decode_bound_tok_s"]
    # useful FLOPs: 2 N per token through the body, 2 V H per completion token through the head;
    # logprob = one forward per no-grad pass, backward = forward + activation-gradient pass
    n_pass = (args.beta != 0.0)                       # mu = 1: old log-probs are the detached ones
    fwd = 2 * info["body_params"] * s["train_tokens"] + 2 * info["head_params"] * s["gen_tokens"]
    out["forward_flops"] = fwd
    if n_pass and s["logprob_s"] > 0:
        out["logprob_fraction_of_peak"] = fwd / s["logprob_s"] / out["peak_flops"]
    if s["backward_s"] > 0:
        out["backward_fraction_of_peak"] = 2 * fwd / s["backward_s"] / out["peak_flops"]
    return out


def estimate_args(args: Args, given: set[str]) -> estimate.Args:
    """The estimate of this bench command: the flags it gives (bench-only ones such as --steps or
    --fastgen do not change memory per step and are dropped), the estimator's GPU settings for
    the rest; auto dtype / checkpointing resolve as on a GPU (bfloat16, on)."""
    kw = {k: getattr(args, k) for k in given if k in estimate.Args.__dataclass_fields__}
    if kw.get("dtype") == "auto":
        kw["dtype"] = "bfloat16"
    if "gradient_checkpointing" in kw and kw["gradient_checkpointing"] is None:
        kw["gradient_checkpointing"] = True
    if args.workload == "text":
        kw["image_size"] = 0
    return estimate.Args(**kw)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(Args, __doc__.split("\n")[0])
    args = Args(**vars(parser.parse_args(argv)))
    try:
        if args.estimate:
            e = estimate.estimate(est := estimate_args(args, given_flags(parser, argv)))
            print(estimate.report(e, est))
            return e
        return _main(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(args):
    args.gradient_checkpointing = resolve_gradient_checkpointing(args.gradient_checkpointing)
    if not args.workload:
        args.workload = "image" if args.image_size else "text"
    if args.workload not in WORKLOADS:
        raise UserError(f"--workload must be one of {', '.join(WORKLOADS)}, not {args.workload!r}.")
    if args.workload != "text" and not args.image_size:
        args.image_size = 112 if args.workload == "agent" else 448
    if args.num_generations < 2:
        raise UserError("GRPO needs --num_generations >= 2 (advantages are centred within a "
                        "group).")
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0.")
    if args.trl_variant not in ("trl", "trl_shipped", "both"):
        raise UserError(f"--trl_variant must be trl, trl_shipped or both, not "
                        f"{args.trl_variant!r}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.save_model:
        size = random_size(args.model)
        if size is None:
            raise UserError(f"--save_model builds qwen2.5-vl-3b or qwen2.5-vl-7b, not "
                            f"{args.model!r}.")
        build_random_folder(size, args.num_layers, args.seed, args.save_model, args.vocab_size)
        return {"saved": args.save_model}
    os.makedirs(args.out, exist_ok=True)
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU, {args.threads or torch.get_num_threads()} threads per side")
    sides = ["ours"]
    skipped = None
    if args.vs_trl:
        skipped = trl_skip_reason(args)
        if skipped is None:
            sides += ["trl", "trl_shipped"] if args.trl_variant == "both" else [args.trl_variant]
        else:
            print(f"[bench] TRL side skipped: {skipped}")
    print(f"[bench] {args.model} on {device}: workload {args.workload}, G={args.num_generations}, "
          f"prompts/step={args.prompts_per_step}, {args.prompt_tokens} prompt text tokens, image "
          f"{args.image_size if args.workload != 'text' else 'none'}, {args.max_new_tokens} new "
          f"tokens"
          f"{' per turn' if args.workload == 'agent' else ''}, beta={args.beta}, "
          f"4-bit={args.load_in_4bit}, "
          f"LoRA={args.lora}, GC={args.gradient_checkpointing}, fastgen={args.fastgen}, "
          f"sides={','.join(sides)}")
    if len(sides) == 1:
        per_side = {"ours": run_side(args, "ours")}
    else:
        per_side = run_alternating(args, sides)

    res = {"model": args.model, "device": device, "args": asdict(args), "trl_skipped": skipped}
    for side in sides:
        s = summarise(per_side[side]["rows"], args.warmup)
        res[side] = {**s, **per_side[side]["info"], "rows": per_side[side]["rows"]}
        print(fmt(side, s, per_side[side]["info"]))
    # peak_gb at the top level of each side is what gpu_check budgets
    if args.limits:
        res["limits"] = limits(args, res, res["ours"], res["ours"])
        L = res["limits"]
        print(f"[bench] limits (measured here, same threads): memory bandwidth "
              f"{L['bandwidth_gbps']:.1f} GB/s"
              + (f" (vendor HBM {L['hbm_vendor_gbps']} GB/s)" if L.get("hbm_vendor_gbps") else "")
              + f", matmul peak {L['peak_flops'] / 1e9:.1f} GFLOP/s")
        print(f"[bench] ours decode {res['ours']['gen_tokens_per_s']:.1f} tok/s = "
              f"{100 * L['decode_fraction']:.1f}% "
              f"of the bandwidth bound {L['decode_bound_tok_s']:.0f} tok/s (B x "
              f"{L['bandwidth_gbps']:.1f} GB/s / "
              f"{res['ours']['decode_bytes'] / 1e9:.3f} GB of weights per decode step)")
        parts = [f"{k.split('_')[0]} {100 * L[k]:.1f}%"
                 for k in ("logprob_fraction_of_peak", "backward_fraction_of_peak")
                 if k in L]
        if parts:
            print(f"[bench] ours training passes at {', '.join(parts)} of the peak FLOP/s "
                  f"(useful FLOPs: {L['forward_flops'] / 1e9:.1f} GFLOP per forward)")
    for side in sides[1:]:
        ro, rt = res["ours"]["rows"][args.warmup:], res[side]["rows"][args.warmup:]
        equal = [a["gen_tokens"] == b["gen_tokens"] for a, b in zip(ro, rt)]
        ratios = [b["step_s"] / a["step_s"] for a, b in zip(ro, rt)]
        res[f"{side}_over_ours"] = statistics.median(ratios)
        res[f"{side}_over_ours_min_max"] = [min(ratios), max(ratios)]
        res[f"{side}_tokens_equal"] = all(equal)
        gen = statistics.median(b["generate_s"] / a["generate_s"] for a, b in zip(ro, rt))
        res[f"{side}_generate_over_ours"] = gen
        print(f"[bench] {side} / ours step time = {res[f'{side}_over_ours']:.2f}x (median of "
              f"per-step ratios, "
              f"{min(ratios):.2f}-{max(ratios):.2f}; > 1: ours faster); generation {gen:.2f}x; "
              f"generated tokens equal every step: {all(equal)}")
        if not all(equal):
            print(f"[bench] WARNING: generated token counts differ "
                  f"({[a['gen_tokens'] for a in ro]} vs "
                  f"{[b['gen_tokens'] for b in rt]}): the two sides did not do the same work")
    if "trl_over_ours" in res:
        res["trl_over_ours_fair"] = res["trl_over_ours"]
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k not in sides} | {
        s: {k: v for k, v in res[s].items() if k != "rows"} for s in sides}))
    return res


if __name__ == "__main__":
    main()
