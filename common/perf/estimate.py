"""Memory of one GRPO step, estimated from the published config before buying GPU time: no
weights are downloaded, loaded or built.

    python -m common.perf.estimate --model Qwen/Qwen2.5-VL-7B-Instruct        # the GPU budget
    python -m common.perf.bench --estimate --model qwen2.5-vl-3b --num_generations 8 \\
        --image_size 448 --max_new_tokens 512 --micro_batch_size 8         # the same, via bench

Defaults are the design's GPU settings: G = 8, one 448x448 image, 512 new tokens, micro-batch 8,
LoRA r = 8, NF4, gradient checkpointing on, bfloat16, beta 0.04; the budget is 12 GB for the 3B
and 16 GB for the 7B. `--model` takes qwen2.5-vl-3b / -7b (or the hub ids), tiny, or a local
model folder (its config.json); --num_layers / --vocab_size shrink a published config as the
bench's --random-weights does.

What is counted (b = bytes of the compute dtype: 2 for bfloat16, 4 for float32; N = tokens of
one micro-batch = rows x (prompt + completion); each line is printed in GB):
  weights       LLM linears in NF4 (0.5 byte + 1/64 byte of double-quantised absmax per weight)
                or b; embeddings, an untied lm_head, norms and the vision tower in b.
  LoRA + AdamW  r x (in + out) per q,k,v,o,gate,up,down per layer, fp32: weight, gradient and
                AdamW's two moments (16 bytes per LoRA weight).
  activations   what autograd keeps for the backward, counted tensor by tensor per decoder layer
                (with frozen base weights only LoRA inputs and the nonlinearities' inputs are
                kept): the RMSNorm inputs in fp32, the LoRA inputs in fp32 (peft casts a bf16
                input to the fp32 adapter's dtype: q, k, v, o, gate, up each keep an H copy and
                down an I copy; in float32 q/k/v and gate/up share theirs), q, k, v and the
                attention output and its log-sum-exp (no L x L matrix: SDPA's fused kernels),
                SiLU's input, its output and up's output, the LoRA A outputs (r), cos/sin once.
                Without checkpointing all layers are kept; with it each layer keeps only its
                input (b x H per token) and one layer is recomputed in the backward. The
                backward's working set on top: two (N, I) fp32-sized gradients in the MLP.
  log-prob chunk  common/logprobs.py runs the lm_head over chunks of `logprob_chunk_tokens`
                (rows x positions); the backward of one chunk holds five (chunk, V) fp32
                buffers at once (the recomputed logits, the gather's gradient, and
                logsumexp's exp(z - lse), its product with the incoming gradient, their sum).
  KV cache      generation: layers x 2 x KV heads x head_dim x b per token, all rows, prompt +
                completion, plus one layer's copy while the cache grows; with a full-precision
                base the LoRA-merged copies of the LLM linears exist while decoding
                (common.generate.merged_lora; + two weight-sized buffers, peft's B A and its
                scaled copy, while the last one is merged), not with NF4.
  batch         the rollout batch's pixel_values (fp32, every row's copy of its image) and the
                image features computed once per distinct image.
  step peak     max(generation, no-grad log-prob passes, training micro-batch) + batch: the
                increment over the loaded model that one GRPO step adds.
Not counted: the CUDA context (~0.5 GB outside torch's allocator) and allocator fragmentation
(reserved minus allocated); budgets are checked on torch.cuda.max_memory_allocated, which
excludes both (common/perf/gpu_check.py).
Checked against measured CPU peaks (tests/test_estimate.py): the tiny preset and a random-weight
Qwen2.5-VL-3B of 2 layers, float32, with and without checkpointing.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from common.cli import parse_args
from common.errors import UserError
from common.models import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, build_tiny_tokenizer, tiny_config
from common.tools import smart_resize

# ---------------------------------------------------------------------------------------------
# published sizes: Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct, config.json on the
# Hugging Face hub (text_config; the vision tower is the same for both, out_hidden_size = hidden)
# ---------------------------------------------------------------------------------------------
QWEN25VL = {  # text_config + the vision tower's out_hidden_size
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
QWEN25VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3)
BUDGET_GB = {"3b": 12.0, "7b": 16.0}   # the project's design budgets (docs/perf.md)
QWEN_TEMPLATE_TOKENS = 21   # Qwen's chat template around one user turn with an image (system
# prompt "You are a helpful assistant.", im_start/im_end, roles, vision_start/end), Qwen tokenizer
GB = 2**30


def random_size(name: str) -> str | None:
    n = name.lower().removesuffix("-random").removesuffix("-instruct")
    for size in QWEN25VL:
        if n in (f"qwen2.5-vl-{size}", f"qwen/qwen2.5-vl-{size}"):
            return size
    return None


@dataclass
class Arch:
    """The sizes an estimate needs (Qwen2.5-VL's LLM and vision tower)."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    v_depth: int
    v_hidden: int
    v_intermediate: int
    patch: int = 14
    merge: int = 2
    temporal_patch: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def arch_from_config(text: dict, vision: dict, tied: bool) -> Arch:
    return Arch(hidden=text["hidden_size"], layers=text["num_hidden_layers"],
                heads=text["num_attention_heads"], kv_heads=text["num_key_value_heads"],
                intermediate=text["intermediate_size"], vocab=text["vocab_size"], tied=tied,
                v_depth=vision["depth"], v_hidden=vision["hidden_size"],
                v_intermediate=vision["intermediate_size"], patch=vision["patch_size"],
                merge=vision["spatial_merge_size"], temporal_patch=vision["temporal_patch_size"])


def arch_of(model: str, num_layers: int = 0, vocab_size: int = 0) -> tuple[Arch, str]:
    """(Arch, the size key "3b" / "7b" or "") of a published name, `tiny`, or a model folder."""
    size = random_size(model)
    if size is not None:
        text, vision, tied = QWEN25VL[size], QWEN25VL_VISION, QWEN25VL[size]["tie_word_embeddings"]
    elif model == "tiny":
        cfg = tiny_config(build_tiny_tokenizer())
        text, vision, tied = cfg.text_config.to_dict(), cfg.vision_config.to_dict(), True
    elif os.path.isfile(os.path.join(model, "config.json")):
        with open(os.path.join(model, "config.json")) as f:
            cfg = json.load(f)
        text, vision = cfg.get("text_config", cfg), cfg["vision_config"]
        tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    else:
        raise UserError(f"no config for {model!r}: use qwen2.5-vl-3b, qwen2.5-vl-7b (or their hub "
                        f"ids), tiny, or a local model folder with a config.json.")
    a = arch_from_config(text, vision, tied)
    if num_layers:
        a.layers = a.v_depth = num_layers
    if vocab_size:
        a.vocab = vocab_size
    return a, size or ""


# ---------------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------------
def llm_linear_params(a: Arch) -> int:
    """Weights of the LoRA-targeted projections of all layers (q, k, v with bias; o, gate, up,
    down without): the part NF4 quantises."""
    H, I, kv = a.hidden, a.intermediate, a.kv_dim
    return a.layers * (H * H + 2 * H * kv + H * H + 3 * H * I)


def llm_other_params(a: Arch) -> int:
    """Embedding (+ untied lm_head), q/k/v biases, norms: kept in the compute dtype."""
    H = a.hidden
    return a.vocab * H * (1 if a.tied else 2) + a.layers * (H + 2 * a.kv_dim + 2 * H) + H


def vision_params(a: Arch) -> int:
    """Qwen2.5-VL's vision tower: patch embedding, blocks (2 RMSNorms, qkv + proj with bias, a
    SwiGLU MLP with bias) and the patch merger (RMSNorm, two linears on merge**2 patches)."""
    vh, vi, m = a.v_hidden, a.v_intermediate, a.merge ** 2 * a.v_hidden
    patch = 3 * a.temporal_patch * a.patch * a.patch * vh
    block = 2 * vh + (vh * 3 * vh + 3 * vh) + (vh * vh + vh) + 2 * (vh * vi + vi) + (vi * vh + vh)
    merger = vh + (m * m + m) + (m * a.hidden + a.hidden)
    return patch + a.v_depth * block + merger


def lora_params(a: Arch, r: int) -> int:
    H, I, kv = a.hidden, a.intermediate, a.kv_dim
    return a.layers * r * ((H + H) + 2 * (H + kv) + (H + H) + 2 * (H + I) + (I + H))


# ---------------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------------
@dataclass
class Args:
    model: str = "qwen2.5-vl-3b"
    """qwen2.5-vl-3b | qwen2.5-vl-7b (or Qwen/Qwen2.5-VL-3B-Instruct, ...), tiny, or a model
    folder"""
    num_layers: int = 0
    """keep this many LLM and ViT blocks (0 = the published depth), as bench --num_layers"""
    vocab_size: int = 0
    """vocabulary size (0 = the config's)"""
    num_generations: int = 8
    """G: completions per prompt"""
    prompts_per_step: int = 1
    """prompts per step (rows = prompts_per_step x G)"""
    micro_batch_size: int = 8
    """rows per forward/backward (0 = all rows)"""
    max_new_tokens: int = 512
    """completion tokens per row (GRPO's max_completion_length)"""
    prompt_tokens: int = 64
    """tokens of user text in the prompt"""
    template_tokens: int = QWEN_TEMPLATE_TOKENS
    """tokens of the chat template around the prompt (21 with Qwen's tokenizer)"""
    image_size: int = 448
    """side of the (square) prompt image in pixels (0 = no image)"""
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    """image processor cap per image (none = Qwen's published 12,845,056)"""
    min_pixels: int | None = DEFAULT_MIN_PIXELS
    """image processor floor per image (none = 3,136)"""
    lora_r: int = 8
    """LoRA rank"""
    load_in_4bit: bool = True
    """NF4 LLM linears"""
    gradient_checkpointing: bool = True
    """recompute each decoder layer in the backward"""
    dtype: str = "bfloat16"
    """compute dtype: bfloat16 (a GPU) or float32 (a CPU)"""
    logprob_chunk_tokens: int = 1024
    """common.grpo: (rows x positions) of logits per log-prob chunk"""
    beta: float = 0.04
    """KL coefficient (non-zero: a no-grad reference pass per micro-batch)"""
    num_iterations: int = 1
    """mu (> 1: a no-grad old-log-prob pass per micro-batch)"""
    ragged: bool = True
    """rows of different lengths (a padding mask): transformers then repeats K and V to every
    head for SDPA; false for forced equal lengths (the bench), where it does not"""
    budget_gb: float = 0.0
    """the budget to compare against (0 = 12 GB for the 3B, 16 GB for the 7B)"""
    json: bool = False
    """print the estimate as one JSON object"""


def vision_tokens(side: int, min_pixels: int | None, max_pixels: int | None,
                  merge: int = 2, patch: int = 14) -> int:
    """Visual tokens of a side x side image after the processor's resize (patches / merge**2)."""
    if side <= 0:
        return 0
    f = patch * merge
    h, w = smart_resize(side, side, factor=f, min_pixels=min_pixels or 56 * 56,
                        max_pixels=max_pixels or 12845056)
    return (h // f) * (w // f)


def estimate(args: Args) -> dict:
    """Every component in bytes (see the module docstring), and the settings it assumed."""
    a, size = arch_of(args.model, args.num_layers, args.vocab_size)
    if args.dtype not in ("bfloat16", "float32"):
        raise UserError(f"--dtype must be bfloat16 or float32, not {args.dtype!r}.")
    b = 2 if args.dtype == "bfloat16" else 4
    cast = b == 2          # fp32 LoRA on a bf16 base: peft casts each LoRA input to fp32
    H, I, V, kv, hd, r = a.hidden, a.intermediate, a.vocab, a.kv_dim, a.head_dim, args.lora_r
    rows = args.num_generations * args.prompts_per_step
    M = min(args.micro_batch_size or rows, rows)
    T = args.max_new_tokens
    img_tok = vision_tokens(args.image_size, args.min_pixels, args.max_pixels, a.merge, a.patch)
    cap_tok = (args.max_pixels or 12845056) // (a.patch * a.merge) ** 2
    prompt = args.template_tokens + args.prompt_tokens + img_tok
    L = prompt + T
    N = M * L

    # weights
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)          # bytes per weight: 4 bits + absmax (8-bit + fp32)
    w_lin = llm_linear_params(a) * (nf4 if args.load_in_4bit else b)
    weights = w_lin + (llm_other_params(a) + vision_params(a)) * b
    n_lora = lora_params(a, r)
    lora_state = 16 * n_lora

    # activations kept per token per decoder layer (bytes), see the module docstring
    kv_kept = H if args.ragged else kv            # K and V repeated to every head with a mask
    norms = 2 * (4 * H + 4)                       # fp32 input (or fp32 copy) + rsqrt, twice
    lora_in = (6 * 4 * H if cast else 2 * 4 * H) + 4 * I   # q,k,v,o,gate,up (shared in fp32), down
    attn = b * (H + 2 * kv_kept) + (b * H if cast else 0) + 4 * a.heads   # q, k, v, out (+ lse)
    if not cast:
        attn += b * H                             # the output, which o's LoRA keeps as its input
    mlp = 3 * b * I                               # SiLU input, SiLU output, up's output
    per_layer = norms + lora_in + attn + mlp + 7 * 4 * r
    first = 4 * H + 4                             # layer 0's input needs no gradient: no norm
    top = 2 * hd * b + (4 * H + 4) + b * H        # cos/sin, the final norm, the hidden states
    work = 2 * 4 * I                              # two (N, I) fp32-sized gradients, MLP backward
    c_pos = M * min(T, max(1, args.logprob_chunk_tokens // M))
    chunk = 5 * c_pos * V * 4
    mask = M * L * L if args.ragged else 0        # SDPA's boolean (M, 1, L, L) mask
    dequant = (max(H * I, H * H) * b) if args.load_in_4bit else 0   # one NF4 weight unpacked
    saved_all = N * (a.layers * per_layer - first + top) + 8 * M * T
    checkpoints = N * (a.layers * b * H + top) + 8 * M * T     # each layer's input, the top
    act_no_gc = saved_all + N * work
    act_gc = checkpoints + N * (per_layer + work)               # + one layer recomputed

    def train_peak(gc: bool) -> int:
        """The training micro-batch: activations, or the chunk's backward on top of what is kept
        while it runs (everything, or the checkpoints), + the mask, a dequantised NF4 weight and
        the LoRA gradients."""
        act, kept = (act_gc, checkpoints) if gc else (act_no_gc, saved_all)
        return max(act, kept + chunk) + mask + dequant + 4 * n_lora

    # no-grad passes (reference when beta != 0, old log-probs when mu > 1): a forward that keeps
    # nothing: the hidden states, one layer's largest temporaries, the chunk's logits
    n_nograd = (args.beta != 0) + (args.num_iterations > 1)
    nograd = (N * (2 * b * H + 3 * b * I) + 2 * c_pos * V * 4 + mask + dequant) if n_nograd else 0

    # generation: KV cache of all rows, prompt + completion; merged LoRA copies (full precision)
    kv_bytes = a.layers * 2 * kv * b * rows * L
    kv_cache = kv_bytes + kv_bytes // a.layers                  # + one layer's copy while it grows
    # with a full-precision base, merged_lora makes W + scale B A of every LoRA-targeted weight;
    # while it merges the last one, peft's B A and its scaled copy exist too
    merged = 0 if args.load_in_4bit else (llm_linear_params(a) + 2 * H * max(H, I)) * b
    generation = kv_cache + merged + rows * V * 4 * 6           # + scores, log-softmax, fp64 cdf

    # the rollout batch: pixel values of every row (fp32, 3 x 2 x 14 x 14 per patch), features
    patches = img_tok * a.merge ** 2
    batch = (rows * patches * 3 * a.temporal_patch * a.patch ** 2 * 4
             + args.prompts_per_step * img_tok * H * b)
    steps = {gc: max(train_peak(gc), nograd, generation) + batch for gc in (True, False)}
    gc = args.gradient_checkpointing
    budget = args.budget_gb or BUDGET_GB.get(size, 0.0)
    return dict(model=args.model, size=size, dtype=args.dtype, rows=rows, micro_batch=M,
                prompt_tokens=prompt, tokens_per_row=L, vision_tokens_per_image=img_tok,
                vision_tokens_at_max_pixels=cap_tok, lora_params=n_lora,
                llm_params=llm_linear_params(a) + llm_other_params(a),
                vision_params=vision_params(a), weights=weights, lora_state=lora_state,
                activations_gc=act_gc, activations_no_gc=act_no_gc, logprob_chunk=chunk,
                kv_cache=kv_cache, merged_lora=merged, generation=generation, nograd_pass=nograd,
                train=train_peak(gc), batch=batch, step=steps[gc],
                total=weights + lora_state + steps[gc],
                total_gc=weights + lora_state + steps[True],
                total_no_gc=weights + lora_state + steps[False], budget_gb=budget)


def report(e: dict, args: Args) -> str:
    g = lambda k: f"{e[k] / GB:7.2f} GB"   # noqa: E731
    fits = lambda k: ("fits" if e[k] <= e["budget_gb"] * GB else "OVER")   # noqa: E731
    head = (f"Memory estimate, {e['model']} ({e['llm_params'] / 1e9:.2f}B LLM + "
            f"{e['vision_params'] / 1e6:.0f}M vision parameters), {e['dtype']}"
            f"{', NF4' if args.load_in_4bit else ''}, LoRA r={args.lora_r}, gradient "
            f"checkpointing {'on' if args.gradient_checkpointing else 'off'}: "
            f"G={args.num_generations} x {args.prompts_per_step} prompt(s), micro-batch "
            f"{e['micro_batch']}, {e['tokens_per_row']} tokens per row ({e['prompt_tokens']} "
            f"prompt incl. {e['vision_tokens_per_image']} vision, {args.max_new_tokens} new)")
    lines = [
        head,
        f"  weights                          {g('weights')}",
        f"  LoRA + AdamW state (fp32)        {g('lora_state')}   ({e['lora_params'] / 1e6:.1f}M "
        f"LoRA weights x 16 bytes)",
        f"  activations per micro-batch      {g('activations_gc')} with gradient checkpointing, "
        f"{e['activations_no_gc'] / GB:.2f} GB without",
        f"  log-prob chunk ((chunk, V) fp32) {g('logprob_chunk')}   (5 buffers in its backward)",
        f"  KV cache for generation          {g('kv_cache')}"
        + (f"   (+ {e['merged_lora'] / GB:.2f} GB LoRA-merged weights while decoding)"
           if e["merged_lora"] else ""),
        f"  rollout batch (pixel values)     {g('batch')}",
        f"  vision tokens per image          {e['vision_tokens_per_image']:7d}      "
        f"(at max_pixels: {e['vision_tokens_at_max_pixels']})",
        f"  one GRPO step over the weights   {g('step')}   (max of training "
        f"{e['train'] / GB:.2f}, generation {e['generation'] / GB:.2f}, no-grad passes "
        f"{e['nograd_pass'] / GB:.2f}; + batch)",
        f"  total                            {g('total')}"
        + (f"   {fits('total')} the {e['budget_gb']:g} GB budget" if e["budget_gb"] else ""),
        f"  total with / without gradient checkpointing: {e['total_gc'] / GB:.2f} / "
        f"{e['total_no_gc'] / GB:.2f} GB",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(Args, argv, description=__doc__.split("\n")[0])
    try:
        e = estimate(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(e) if args.json else report(e, args))
    return e


if __name__ == "__main__":
    main()
