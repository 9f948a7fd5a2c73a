"""GRPO benchmark: time one GRPO step (rollout + log-probs + update), optionally side by side with TRL.

    python -m common.bench --model tiny --steps 1 --warmup 0                          # plumbing, seconds
    python -m common.bench --model smollm2 --num_generations 8 --max_new_tokens 32 --vs-trl --threads 1  # CPU
    python -m common.bench --model tiny --image_size 448 --max_new_tokens 32         # VLM path, one image
    python -m common.bench --model qwen2.5-vl-3b --random-weights --num_layers 2 \\
        --steps 1 --warmup 0 --max_new_tokens 4 --prompt_tokens 16                     # CPU smoke of the real-size path
    # GPU (the issue-9 budgets): NF4 + LoRA + gradient checkpointing, G = 8, one 448x448 image, 512 new tokens
    python -m common.bench --model qwen2.5-vl-3b --random-weights --load_in_4bit --gradient_checkpointing \\
        --num_generations 8 --image_size 448 --max_new_tokens 512 --steps 3 --warmup 1 --beta 0.04

Our side is `common.grpo.train_grpo` itself (rollouts from `common.rollout.run_rollouts`, single
turn; log-probs from `common.grpo.completion_logprobs`; `grpo_loss`, backward, AdamW), timed
through its own `time/*` metrics and its `on_step` hook. TRL's side is `trl.GRPOTrainer` on a
second copy of the same model (same seed, LoRA config, G, beta, max new tokens), timed by
wrapping its `_generate`, `_generate_and_score_completions` and `_get_per_token_logps_and_entropies`.
With --vs-trl the two loops run in two threads that hand a baton back and forth, so the steps
alternate (ours, TRL, ours, ...) and never overlap; each keeps its own optimizer and data order.

Both sides do identical work: every completion is exactly --max_new_tokens long (end-of-turn
suppressed with `min_new_tokens`), the reward is the same cheap function of the text, the
prompt is the same --prompt_tokens of user text (+ one --image_size noise image).
Splits: generate = sampling; logprob = no-grad passes (reference when beta != 0, old log-probs
when mu > 1); backward = the forward with grad + backward + optimizer step; other = the rest
(rewards, batching, Trainer bookkeeping). Peak memory: torch.cuda.max_memory_allocated on a
GPU, peak RSS (ru_maxrss, whole process: both models with --vs-trl) on a CPU.

--random-weights builds Qwen2.5-VL-3B/7B-Instruct from the published config values
(shared/papers/qwen25vl.md) with random weights, so memory and speed at real sizes need no hub.
The tokenizer is the tiny preset's (~1k tokens, Qwen's special tokens) with the embedding at
the real vocab size (151,936 / 152,064): the compute and memory are the real model's, the
sampled text is noise. --num_layers N keeps N LLM blocks and N ViT blocks (a CPU smoke).
--patch NAME monkeypatches a proposed common/ fix for a before/after run (see PATCHES).
TRL with an image prompt needs Qwen2_5_VLProcessor, hence torchvision; without it use --image_size 0.
On a busy CPU pass --threads 1: two OpenMP threads on a contended 2-core box made decoding ~60x slower.
"""
from __future__ import annotations

import json
import os
import random
import resource
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import grpo as grpo_mod
from common import rollout as rollout_mod
from common.cli import parse_args
from common.grpo import GRPOConfig, per_rollout, train_grpo
from common.models import LORA_TARGETS, build_tiny_tokenizer, image_processor_for, load_policy
from common.runlog import read_jsonl


@dataclass
class Args:
    model: str = "tiny"
    """preset (tiny, smollm2), hub id or folder; qwen2.5-vl-3b / qwen2.5-vl-7b with --random-weights"""
    random_weights: bool = False
    """build Qwen2.5-VL-3B/7B-Instruct from the published config with random weights (no hub)"""
    num_layers: int = 0
    """random weights only: keep this many LLM and ViT blocks (0 = the published depth)"""
    num_generations: int = 4
    """G: completions per prompt"""
    prompts_per_step: int = 1
    """prompts per step (B = prompts_per_step x G)"""
    image_size: int = 0
    """side of the one noise image in the prompt (0 = text-only prompt); VLMs only"""
    prompt_tokens: int = 64
    """tokens of user text in the prompt (the chat template adds ~20)"""
    max_new_tokens: int = 32
    """tokens per completion; every completion is forced to exactly this length"""
    steps: int = 3
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
    """sequences per forward/backward (0 = the whole batch, as TRL's per_device_train_batch_size = B)"""
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
    gradient_checkpointing: bool = False
    """activation checkpointing in the decoder"""
    vs_trl: bool = False
    """also run TRL's GRPOTrainer on the same work, alternating steps, and print the time ratio"""
    patch: str = ""
    """comma-separated proposed common/ fixes to monkeypatch (see PATCHES in common/bench.py)"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    seed: int = 0
    """seed for weights, LoRA init, prompt text, image and sampling"""
    out: str = "runs/bench"
    """output folder (ours/ and trl/ run folders, result.json)"""


# ---------------------------------------------------------------------------------------------
# random-weight Qwen2.5-VL at published sizes (shared/papers/qwen25vl.md)
# ---------------------------------------------------------------------------------------------
QWEN25VL = {  # text_config + the vision tower's out_hidden_size
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
QWEN25VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3)


def random_size(name: str) -> str | None:
    n = name.lower().removesuffix("-random").removesuffix("-instruct")
    for size in QWEN25VL:
        if n in (f"qwen2.5-vl-{size}", f"qwen/qwen2.5-vl-{size}"):
            return size
    return None


def qwen25vl_config(size: str, tok, num_layers: int = 0):
    from transformers import Qwen2_5_VLConfig
    text = dict(QWEN25VL[size], rms_norm_eps=1e-6, max_position_embeddings=128000, hidden_act="silu",
                rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    vision = dict(QWEN25VL_VISION, out_hidden_size=text["hidden_size"])
    if num_layers:  # a truncated copy for a CPU smoke: N LLM blocks, N ViT blocks (last one full attention)
        text["num_hidden_layers"] = num_layers
        vision["depth"] = num_layers
        vision["fullatt_block_indexes"] = sorted({i for i in vision["fullatt_block_indexes"] if i < num_layers}
                                                 | {num_layers - 1})
    ids = tok.convert_tokens_to_ids  # the tiny tokenizer's ids for Qwen's special tokens
    text.update(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"),
                            tie_word_embeddings=text["tie_word_embeddings"])


def build_random_folder(size: str, num_layers: int, seed: int, folder: str) -> str:
    """Random Qwen2.5-VL-<size> (+ tiny tokenizer, Qwen image processor) saved to `folder`, so
    `load_policy(folder, ...)` loads it like any checkpoint (NF4 quantises while loading)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    tok = build_tiny_tokenizer()
    cfg = qwen25vl_config(size, tok, num_layers)
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
# the work: prompt, forced-length generation, reward
# ---------------------------------------------------------------------------------------------
WORDS = ("the a of to and in is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no what up "
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


def forced_generate(policy, seqs, *, max_new_tokens: int, **kw):
    """common.rollout.generate_ids with end-of-turn suppressed until max_new_tokens
    (generation_config.min_new_tokens), so every completion has exactly max_new_tokens tokens."""
    gc = grpo_mod.unwrap(policy.model).generation_config
    old = gc.min_new_tokens
    gc.min_new_tokens = max_new_tokens
    try:
        return rollout_mod.generate_ids(policy, seqs, max_new_tokens=max_new_tokens, **kw)
    finally:
        gc.min_new_tokens = old


# ---------------------------------------------------------------------------------------------
# proposed common/ fixes, monkeypatched for before/after runs (--patch a,b)
# ---------------------------------------------------------------------------------------------
def _patch_head_no_checkpoint(max_bytes: int = 256 * 2**20):
    """completion_logprobs without activation checkpointing around an lm_head chunk whose fp32
    logits are small (<= 256 MB): the checkpoint saves little memory there and recomputes the
    (B, c, V) head matmul + log_softmax in the backward."""
    orig = grpo_mod.checkpoint

    def maybe_checkpoint(fn, head, h, targets, temperature, use_reentrant=False):
        if h.shape[0] * h.shape[1] * head.weight.shape[0] * 4 <= max_bytes:
            return fn(head, h, targets, temperature)
        return orig(fn, head, h, targets, temperature, use_reentrant=use_reentrant)
    grpo_mod.checkpoint = maybe_checkpoint


PATCHES = {
    "head_no_checkpoint": _patch_head_no_checkpoint,
}


# ---------------------------------------------------------------------------------------------
# measurement plumbing
# ---------------------------------------------------------------------------------------------
def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB on Linux


HBM_GBPS = {"H100": 3350, "H200": 4800, "A100": 2039, "L40S": 864, "RTX 4090": 1008}  # vendor peak, GB/s


def decode_weight_bytes(policy) -> int:
    """Bytes one decode step must read: the LLM's weights (NF4 packed + fp32/bf16 rest) and the
    lm_head; not the ViT (prompt only) nor an untied input embedding (one row per token)."""
    hf = grpo_mod.unwrap(policy.model)
    embed = hf.get_input_embeddings().weight
    seen, total = set(), 0
    for name, p in hf.named_parameters():
        if "visual" in name or p.data_ptr() in seen or (p is embed and hf.get_output_embeddings().weight is not embed):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


class Baton:
    """Two loops in two threads take turns: `wait(me)` blocks until it is my turn."""

    def __init__(self, first: str):
        self.turn, self.error = first, None
        self.cv = threading.Condition()

    def give(self, to: str):
        with self.cv:
            self.turn = to
            self.cv.notify_all()

    def wait(self, me: str):
        with self.cv:
            self.cv.wait_for(lambda: self.turn == me or self.error is not None)
            if self.error is not None and self.turn != me:
                raise RuntimeError("the other benchmark loop failed") from self.error

    def fail(self, e: BaseException):
        with self.cv:
            self.error = e
            self.cv.notify_all()


def summarise(rows: list[dict], warmup: int) -> dict:
    """Mean over the measured steps of each split; tokens/s over generation time."""
    m = rows[warmup:] or rows
    mean = lambda k: float(np.mean([r[k] for r in m]))
    out = {k: mean(k) for k in ("step_s", "generate_s", "logprob_s", "backward_s")}
    out["other_s"] = out["step_s"] - out["generate_s"] - out["logprob_s"] - out["backward_s"]
    out["gen_tokens"] = mean("gen_tokens")
    out["gen_tokens_per_s"] = sum(r["gen_tokens"] for r in m) / max(sum(r["generate_s"] for r in m), 1e-9)
    out["steps"] = len(m)
    if "peak_gb" in m[0]:
        out["peak_gb"] = max(r["peak_gb"] for r in m)
    return out


# ---------------------------------------------------------------------------------------------
# ours: common.grpo.train_grpo
# ---------------------------------------------------------------------------------------------
def make_messages(args, text, image):
    if image is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def run_ours(policy, args, text, image, out_dir, baton: Baton | None = None) -> list[dict]:
    G, total = args.num_generations, args.warmup + args.steps
    cfg = GRPOConfig(learning_rate=args.learning_rate, num_generations=G, prompts_per_step=args.prompts_per_step,
                     max_steps=total, beta=args.beta, loss_type=args.loss_type,
                     max_completion_length=args.max_new_tokens,
                     micro_batch_size=args.micro_batch_size or G * args.prompts_per_step,
                     logprob_chunk_tokens=args.logprob_chunk_tokens, seed=args.seed)
    dataset = [{"id": i} for i in range(args.prompts_per_step * total)]

    def rollout_fn(policy, examples, cfg):  # single turn, no tools
        return rollout_mod.run_rollouts(policy, examples, num_generations=cfg.num_generations,
                                        make_messages=lambda ex: make_messages(args, text, image),
                                        max_turns=1, max_new_tokens=cfg.max_completion_length,
                                        max_total_tokens=1 << 30, temperature=cfg.temperature,
                                        generate=forced_generate)

    reward_fn = per_rollout(lambda r, ex: {"reward": reward_text(r.generated_text())})
    rows, clock = [], {"t": 0.0}

    def on_step(step, rollouts, terms):
        t_end = time.perf_counter()
        m = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))[-1]      # train_grpo's own split timers
        rows.append(dict(step_s=t_end - clock["t"], generate_s=m["time/generate"], logprob_s=m["time/logprob"],
                         backward_s=m["time/backward"], gen_tokens=sum(r.n_generated for r in rollouts),
                         peak_gb=peak_memory_gb()))
        if step + 1 == args.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if baton is not None:
            baton.give("trl")
            baton.wait("ours")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        clock["t"] = time.perf_counter()

    if baton is not None:
        baton.wait("ours")
    clock["t"] = time.perf_counter()
    train_grpo(policy, dataset, rollout_fn, reward_fn, cfg, out_dir, on_step=on_step)
    return rows


# ---------------------------------------------------------------------------------------------
# TRL: trl.GRPOTrainer on a second copy of the same model
# ---------------------------------------------------------------------------------------------
def trl_processor(policy):
    """Qwen2_5_VLProcessor from our tokenizer + image processor (TRL needs it for images)."""
    try:
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
        return Qwen2_5_VLProcessor(image_processor=policy.image_processor, tokenizer=policy.tokenizer,
                                   video_processor=Qwen2VLVideoProcessor(),
                                   chat_template=policy.tokenizer.chat_template)
    except (ImportError, AttributeError, ValueError) as e:
        raise SystemExit(f"TRL needs a Qwen2_5_VLProcessor for image prompts, which cannot be built here "
                         f"({type(e).__name__}: {e}; it needs torchvision); rerun with --image_size 0.") from e


def make_trl_trainer(args, text, image, out_dir):
    try:
        from datasets import Dataset
        from peft import LoraConfig
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer
    except ImportError as e:
        raise SystemExit(f"--vs-trl needs TRL, an optional dependency: pip install trl ({e}).") from e
    policy = load_model(args, lora=False, gradient_checkpointing=False)  # TRL adds LoRA and checkpointing
    hq = getattr(policy.model, "hf_quantizer", None)
    if hq is not None and str(getattr(hq.quantization_config.quant_method, "value", "")) == "gguf":
        hq.remove_quantization_config(policy.model)  # smollm2: GGUF is only the file format (weights dequantized at load),
        # but transformers' Trainer refuses any model marked GGUF-quantized
    cuda = torch.cuda.is_available()
    B, total = args.num_generations * args.prompts_per_step, args.warmup + args.steps
    cfg = TRLConfig(output_dir=out_dir, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                    num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
                    max_steps=total, learning_rate=args.learning_rate, lr_scheduler_type="constant",
                    weight_decay=0.0, max_grad_norm=1.0, beta=args.beta, loss_type=args.loss_type,
                    epsilon=0.2, scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0,
                    generation_kwargs={"min_new_tokens": args.max_new_tokens},  # same forced length
                    gradient_checkpointing=args.gradient_checkpointing,
                    gradient_checkpointing_kwargs={"use_reentrant": False},
                    bf16=cuda, use_cpu=not cuda, report_to="none", save_strategy="no", logging_steps=10**6,
                    disable_tqdm=True, shuffle_dataset=False, seed=args.seed, log_completions=False)
    row = {"prompt": [{"role": "user", "content": text}]}
    if image is not None:
        row["image"] = image
    dataset = Dataset.from_list([row] * (args.prompts_per_step * total))
    processing = trl_processor(policy) if image is not None else policy.tokenizer
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=(r".*language_model.*\.(" + "|".join(LORA_TARGETS) + r")") if policy.is_vlm
                      else list(LORA_TARGETS)) if args.lora else None
    counts = []

    def reward(completions, completion_ids, **kw):
        counts.append(sum(len(c) for c in completion_ids))
        return [reward_text(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    trainer = GRPOTrainer(model=policy.model, reward_funcs=reward, args=cfg, train_dataset=dataset,
                          processing_class=processing, peft_config=lora)
    return trainer, counts


def run_trl(trainer, counts, args, baton: Baton | None = None) -> list[dict]:
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
    trainer._get_per_token_logps_and_entropies = timed("lp", trainer._get_per_token_logps_and_entropies, True)
    rows, clock = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if baton is not None:
                baton.give("ours")
                baton.wait("trl")
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            acc.update(gen=0.0, lp=0.0, prep=0.0)
            clock["t"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_s = time.perf_counter() - clock["t"]
            rows.append(dict(step_s=step_s, generate_s=acc["gen"], logprob_s=acc["lp"],
                             backward_s=step_s - acc["prep"], gen_tokens=counts[-1], peak_gb=peak_memory_gb()))
            if len(rows) == args.warmup and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_train_end(self, a, state, control, **kw):
            if baton is not None:
                baton.give("ours")  # let our loop finish

    trainer.add_callback(Clock())
    trainer.train()
    return rows


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
_RANDOM_FOLDERS: dict = {}


def load_model(args, lora: bool, gradient_checkpointing: bool):
    name = args.model
    size = random_size(name)
    if args.random_weights or name.lower().endswith("-random"):
        if size is None:
            raise SystemExit(f"--random-weights builds qwen2.5-vl-3b or qwen2.5-vl-7b, not {name!r}.")
        if size not in _RANDOM_FOLDERS:
            _RANDOM_FOLDERS[size] = tempfile.TemporaryDirectory(prefix=f"bench-qwen25vl-{size}-")
            build_random_folder(size, args.num_layers, args.seed, _RANDOM_FOLDERS[size].name)
        name = _RANDOM_FOLDERS[size].name
    elif args.num_layers:
        raise SystemExit("--num_layers only applies to --random-weights models.")
    return load_policy(name, load_in_4bit=args.load_in_4bit, lora=lora, lora_r=args.lora_r,
                       lora_alpha=args.lora_alpha, gradient_checkpointing=gradient_checkpointing, seed=args.seed)


def fmt(name: str, s: dict) -> str:
    return (f"{name:5s} step {s['step_s']:7.2f}s = generate {s['generate_s']:6.2f} + logprob/ref "
            f"{s['logprob_s']:6.2f} + backward {s['backward_s']:6.2f} + other {s['other_s']:5.2f} | "
            f"{s['gen_tokens_per_s']:7.1f} gen tok/s | peak {s.get('peak_gb', 0):.2f} GB")


def main(argv=None):
    args = parse_args(Args, argv, description=__doc__.split("\n")[0])
    if args.num_generations < 2:
        raise SystemExit("GRPO needs --num_generations >= 2 (advantages are centred within a group).")
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1.")
    for p in filter(None, args.patch.split(",")):
        if p not in PATCHES:
            raise SystemExit(f"Unknown --patch {p!r}; choose from {', '.join(PATCHES)}.")
        PATCHES[p]()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    policy = load_model(args, lora=args.lora, gradient_checkpointing=args.gradient_checkpointing)
    if args.image_size and not policy.is_vlm:
        raise SystemExit(f"--image_size needs a vision-language model; {args.model} is text-only (use --image_size 0).")
    text = prompt_text(policy.tokenizer, args.prompt_tokens, args.seed)
    image = noise_image(args.image_size, args.seed) if args.image_size else None
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU, {torch.get_num_threads()} threads")
    print(f"[bench] {args.model} on {device}: G={args.num_generations}, prompts/step={args.prompts_per_step}, "
          f"{args.prompt_tokens} prompt text tokens, image {args.image_size or 'none'}, "
          f"{args.max_new_tokens} new tokens, beta={args.beta}, 4-bit={policy.extra['load_in_4bit']}, "
          f"LoRA={args.lora}, GC={args.gradient_checkpointing}, patches={args.patch or 'none'}")

    ours_dir = os.path.join(args.out, "ours")
    if not args.vs_trl:
        rows_ours, rows_trl = run_ours(policy, args, text, image, ours_dir), None
    else:
        trainer, counts = make_trl_trainer(args, text, image, os.path.join(args.out, "trl"))
        baton, result = Baton(first="trl"), {}

        def ours_thread():
            try:
                result["ours"] = run_ours(policy, args, text, image, ours_dir, baton)
            except BaseException as e:  # hand the failure to the other loop, then re-raise in main
                result["error"] = e
                baton.fail(e)

        th = threading.Thread(target=ours_thread, daemon=True)
        th.start()
        try:
            rows_trl = run_trl(trainer, counts, args, baton)
        except BaseException as e:
            baton.fail(e)
            raise
        th.join()
        if "error" in result:
            raise result["error"]
        rows_ours = result["ours"]

    s_ours = summarise(rows_ours, args.warmup)
    print(fmt("ours", s_ours))
    res = {"model": args.model, "device": device, "G": args.num_generations,
           "prompts_per_step": args.prompts_per_step, "image_size": args.image_size,
           "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens, "beta": args.beta,
           "load_in_4bit": policy.extra["load_in_4bit"], "lora": args.lora,
           "gradient_checkpointing": args.gradient_checkpointing, "patch": args.patch,
           "ours": s_ours, "peak_rss_gb" if not torch.cuda.is_available() else "peak_cuda_gb": peak_memory_gb()}
    res["decode_weight_gb"] = decode_weight_bytes(policy) / 1e9
    gbps = next((v for k, v in HBM_GBPS.items() if k in device), None) if torch.cuda.is_available() else None
    if gbps:  # batched decode reads every weight once per step for all B sequences
        B = args.num_generations * args.prompts_per_step
        res["bandwidth_bound_tok_s"] = B * gbps / res["decode_weight_gb"]
        res["fraction_of_bound"] = s_ours["gen_tokens_per_s"] / res["bandwidth_bound_tok_s"]
        print(f"[bench] generation {s_ours['gen_tokens_per_s']:.0f} tok/s = {100 * res['fraction_of_bound']:.1f}% of "
              f"the bandwidth bound {res['bandwidth_bound_tok_s']:.0f} tok/s (B={B} x {gbps} GB/s / "
              f"{res['decode_weight_gb']:.2f} GB of weights per step)")
    if rows_trl is not None:
        s_trl = summarise(rows_trl, args.warmup)
        res["trl"] = s_trl
        res["trl_over_ours"] = s_trl["step_s"] / s_ours["step_s"]
        print(fmt("trl", s_trl))
        print(f"[bench] TRL step time / ours = {res['trl_over_ours']:.2f}x "
              f"(> 1: ours faster; goal >= 1.3)")
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
