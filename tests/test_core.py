# Run: pytest tests/test_core.py -q
"""The shared core on the tiny preset: loading (4-bit + LoRA), chat inputs, SFT masks, GRPO
steps end to end, and resume from a checkpoint."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from common import chat as chatmod
from common.chat import encode
from common.grpo import GRPOConfig, train_grpo
from common.errors import UserError
from common.logprobs import completion_logprobs
from common.rewards import per_rollout
from common.models import build_tiny_tokenizer, image_processor_for, load_policy
from common.rollout import rollout_batch, run_rollouts
from common.sft import masked_nll, sft_batch


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def ip():
    return image_processor_for()


def _img(w, h, c=(200, 30, 30)):
    return Image.new("RGB", (w, h), c)


# ---------------------------------------------------------------------------------- models
def test_tiny_4bit_lora_trainable_and_reference():
    p = load_policy("tiny", load_in_4bit=True)
    import bitsandbytes as bnb
    four_bit = {n for n, m in p.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert any(n.endswith("self_attn.q_proj.base_layer") for n in four_bit)   # the LLM is NF4
    # the ViT, merger and head are not
    assert not [n for n in four_bit if ".visual." in n or "lm_head" in n]
    names = [n for n, q in p.model.named_parameters() if q.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("visual" in n for n in names)          # the vision tower stays frozen
    ids = torch.tensor([p.tokenizer.encode("hello there, general")])
    with torch.no_grad():
        base = p.model(input_ids=ids).logits
    opt = torch.optim.SGD(p.trainable_parameters(), lr=1.0)
    p.model(input_ids=ids).logits.square().mean().backward()
    opt.step()
    with torch.no_grad():
        tuned = p.model(input_ids=ids).logits
        with p.reference():
            ref = p.model(input_ids=ids).logits
    assert not torch.allclose(tuned, base)                 # the update moved the policy
    assert torch.allclose(ref, base, atol=1e-6)            # adapter off = the base model


def test_adapter_roundtrip(tmp_path):
    p = load_policy("tiny", seed=3)
    for n, q in p.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(q, std=0.5)
    p.save_adapter(str(tmp_path / "ad"))
    assert (tmp_path / "ad" / "adapter_config.json").exists()
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists()
    q = load_policy("tiny", seed=3, adapter=str(tmp_path / "ad"))
    ids = torch.tensor([p.tokenizer.encode("some words")])
    with torch.no_grad():
        assert torch.allclose(p.model(input_ids=ids).logits, q.model(input_ids=ids).logits,
                              atol=1e-6)


def test_reference_is_the_starting_adapter(tmp_path):
    """RL from a saved (SFT) adapter: pi_ref is a frozen copy of that adapter, not the base
    model. KL is exactly 0 at the first step and positive after an update; the copy never
    trains, is not saved with the policy, and is gone after the run (reference() = base again)."""
    p = load_policy("tiny", seed=3)
    for n, q in p.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(q, std=0.5, generator=torch.Generator().manual_seed(0))
    p.save_adapter(str(tmp_path / "sft"))
    q = load_policy("tiny", seed=3, adapter=str(tmp_path / "sft"))
    ids = torch.tensor([q.tokenizer.encode("some words here")])
    with torch.no_grad():
        start = q.model(input_ids=ids).logits
        with q.base():
            base = q.model(input_ids=ids).logits
    assert not torch.allclose(start, base, atol=1e-3)
    seen = {}
    data, rollout_fn, reward = _toy_setup()

    def spy(pol, exs, cfg):  # look inside the run: reference() is the starting adapter, frozen
        with torch.no_grad(), pol.reference():
            seen.setdefault("ref", []).append(pol.model(input_ids=ids).logits)
        seen["trainable"] = [n for n, x in pol.model.named_parameters() if x.requires_grad]
        return rollout_fn(pol, exs, cfg)
    cfg = GRPOConfig(max_steps=2, num_generations=3, prompts_per_step=2, max_completion_length=6,
                     beta=0.1, learning_rate=5e-2)
    train_grpo(q, data, spy, reward, cfg, str(tmp_path / "rl"))
    from common.runlog import read_jsonl
    kl = [r["kl"] for r in read_jsonl(str(tmp_path / "rl" / "metrics.jsonl"))]
    assert kl[0] == 0.0 and kl[1] > 0.0, kl
    assert all(torch.equal(r, start) for r in seen["ref"])                # pi_ref did not move
    assert seen["trainable"] and all(".default." in n for n in seen["trainable"])
    assert not (tmp_path / "rl" / "adapter" / "reference").exists()
    assert "reference" not in q.model.peft_config                          # removed after the run
    with torch.no_grad(), q.reference():
        assert torch.equal(q.model(input_ids=ids).logits, base)


def test_bad_model_names_and_4bit_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown model 'no-such-model': use a preset"):
        load_policy("no-such-model")
    with pytest.raises(FileNotFoundError):
        load_policy("tiny", adapter="/nonexistent/adapter")
    import bitsandbytes.functional as F

    def broken(*a, **k):
        raise RuntimeError("no 4-bit kernels for this device")
    monkeypatch.setattr(F, "quantize_4bit", broken)
    with pytest.raises(RuntimeError, match="--no-4bit"):
        load_policy("tiny", load_in_4bit=True)


# ---------------------------------------------------------------------------------- chat
@pytest.mark.parametrize("w,h", [(640, 480), (100, 60), (56, 200), (28, 28), (1000, 330)])
def test_image_token_counts(tok, ip, w, h):
    e = encode(tok, ip, [{"role": "user", "content": [{"type": "image", "image": _img(w, h)},
                                                      {"type": "text", "text": "hi"}]}])
    t, gh, gw = e.image_grid_thw[0].tolist()
    n_pad = e.input_ids.count(tok.convert_tokens_to_ids("<|image_pad|>"))
    assert n_pad == t * gh * gw // 4
    assert e.pixel_values.shape == (t * gh * gw, 3 * 2 * 14 * 14)
    if (w, h) == (640, 480):                       # qwen25vl.md: 644x476 -> (1, 34, 46) -> 391
        assert (t, gh, gw, n_pad) == (1, 34, 46, 391)


def test_expansion_matches_qwen_processor(tok, ip):
    """Same ids as Qwen2_5_VLProcessor's own replacement rule, applied to the template text."""
    from transformers import Qwen2_5_VLProcessor

    class Stub:  # the processor cannot be built without torchvision; its rule needs only these
        image_processor, image_token = ip, "<|image_pad|>"
    imgs = [_img(300, 200), _img(90, 150, (0, 0, 255))]
    msgs = [{"role": "user",
             "content": [{"type": "image", "image": imgs[0]}, {"type": "text", "text": "a"}]},
            {"role": "assistant", "content": "b"},
            {"role": "user",
             "content": [{"type": "image", "image": imgs[1]}, {"type": "text", "text": "c"}]}]
    e = encode(tok, ip, msgs, add_generation_prompt=True)
    text = chatmod.render(tok, msgs, add_generation_prompt=True)
    grids = ip(images=imgs, return_tensors="pt")["image_grid_thw"]
    parts = text.split("<|image_pad|>")
    pads = [Qwen2_5_VLProcessor.replace_image_token(Stub(), {"image_grid_thw": grids}, i)
            for i in range(len(imgs))]
    expanded = parts[0] + "".join(pads[i] + parts[i + 1] for i in range(len(imgs)))
    assert tok(expanded, add_special_tokens=False)["input_ids"] == e.input_ids
    assert torch.equal(e.image_grid_thw, grids)


def test_assistant_mask(tok, ip):
    msgs = [{"role": "user",
             "content": [{"type": "image", "image": _img(80, 80)},
                         {"type": "text", "text": "colour?"}]},
            {"role": "assistant", "content": "<answer>red</answer>"},
            {"role": "user", "content": "sure?"},
            {"role": "assistant", "content": "copied", "train": False},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "yes"}]
    e = encode(tok, ip, msgs)
    kept = tok.decode([i for i, m in zip(e.input_ids, e.loss_mask) if m])
    assert kept == "<answer>red</answer><|im_end|>yes<|im_end|>"


def test_text_only_tokenizer_rejects_images(tok):
    with pytest.raises(ValueError, match="text-only"):
        chatmod.flatten([{"role": "user", "content": [{"type": "image", "image": _img(30, 30)}]}])


def test_forward_logprobs_match_sampling_with_images():
    """Sampled rollouts (generate_ids: batched, left-padded, two image sizes, temperature 0.8):
    the sampler's log-probs equal the training forward's (mm_token_type_ids gives it the same
    3-D positions as generate) on every generated token, the 5 suppressed vision tokens aside."""
    from common.generate import vision_token_ids
    p = load_policy("tiny", lora=False)
    data = [{"img": _img(100, 60), "q": "What?"},
            {"img": _img(60, 150, (0, 90, 0)), "q": "Which colour is it?"}]
    torch.manual_seed(0)
    rs = run_rollouts(p, data, num_generations=2, max_new_tokens=6, temperature=0.8,
                      make_messages=lambda e: [
        {"role": "user",
         "content": [{"type": "image", "image": e["img"]}, {"type": "text", "text": e["q"]}]}])
    b = rollout_batch(rs, p.tokenizer)
    with torch.no_grad():
        lp, _ = completion_logprobs(p.model, b, temperature=0.8)                       # (B, T)
        inputs = {k: v for k, v in b.items() if k not in ("completion_mask", "n_images")}
        # (B, T, V)
        z = p.model(**inputs).logits[:, -b["completion_mask"].shape[1] - 1: -1].float() / 0.8
    full = z.log_softmax(-1).gather(-1, b["input_ids"][:, -z.shape[1]:, None]).squeeze(-1)
    z[..., vision_token_ids(p.tokenizer)] = -float("inf")
    sampler = z.log_softmax(-1).gather(-1, b["input_ids"][:, -z.shape[1]:, None]).squeeze(-1)
    m = b["completion_mask"].bool()
    assert torch.allclose(lp[m], full[m], atol=1e-5)
    for i, r in enumerate(rs):
        n = len(r.ids)
        assert torch.allclose(torch.tensor(r.sample_logps), sampler[i, :n], atol=1e-4)


# ---------------------------------------------------------------------------------- SFT
def test_sft_loss_counts_only_masked_tokens(tok, ip):
    p = load_policy("tiny")
    msgs = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "the answer"}]
    e = encode(p.tokenizer, p.image_processor, msgs)
    batch = sft_batch([e], p.tokenizer)
    with torch.no_grad():
        nll, n = masked_nll(p, batch)
        logits = p.model(input_ids=batch["input_ids"]).logits[0, :-1].log_softmax(-1)
        tgt = batch["input_ids"][0, 1:]
        m = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
        manual = -logits.gather(-1, tgt[:, None])[:, 0][m].sum()
    assert n.item() == sum(e.loss_mask) and nll.item() == pytest.approx(manual.item(), rel=1e-5)
    # in a padded batch with a longer sample, the same sample's loss and token count are
    # unchanged (padding and the other sample's prompt never count)
    long = encode(p.tokenizer, p.image_processor,
                  [{"role": "user", "content": "a much longer question here"},
                                                    {"role": "assistant",
                                                     "content": "and a longer answer too"}])
    with torch.no_grad():
        nll2, n2 = masked_nll(p, sft_batch([e, long], p.tokenizer))
        nll_long, n_long = masked_nll(p, sft_batch([long], p.tokenizer))
    assert n2.item() == n.item() + n_long.item()
    assert nll2.item() == pytest.approx(nll.item() + nll_long.item(), rel=1e-5)


# ---------------------------------------------------------------------------------- GRPO loop
def _toy_setup():
    data = [{"q": "Say A", "img": _img(60, 60)}, {"q": "Say B", "img": None},
            {"q": "Say C", "img": _img(40, 90)}]

    def mk(ex):
        c = ([{"type": "image", "image": ex["img"]}] if ex["img"] is not None
             else []) + [{"type": "text", "text": ex["q"]}]
        return [{"role": "user", "content": c}]

    def rollout_fn(pol, exs, cfg):
        return run_rollouts(pol, exs, num_generations=cfg.num_generations, make_messages=mk,
                            max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature)
    reward = per_rollout(lambda r, ex: {"reward": float(sum(r.ids) % 7) / 7, "n_ids": len(r.ids)})
    return data, rollout_fn, reward


def test_grpo_steps_end_to_end(tmp_path):
    """4-bit + images + mu = 2 + beta, sampled: from a fresh LoRA the policy is the reference, so
    step 0's sampler gap is tiny and its KL (logged over both updates) comes only from the first
    update: small and positive; the update moves the LoRA weights; the stop reasons partition
    the rollouts; every update has a gradient norm."""
    p = load_policy("tiny", load_in_4bit=True)
    data, rollout_fn, reward = _toy_setup()
    cfg = GRPOConfig(max_steps=2, num_generations=3, prompts_per_step=2, max_completion_length=8,
                     beta=0.04, num_iterations=2, micro_batch_size=4, learning_rate=1e-3)
    before = {n: q.detach().clone() for n, q in p.model.named_parameters() if q.requires_grad}
    train_grpo(p, data, rollout_fn, reward, cfg, str(tmp_path))
    after = dict(p.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    from common.runlog import read_jsonl
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0,
                                         1] and 0 < rows[0]["kl"] < 1e-2 and rows[0]["skipped"] == 0
    assert rows[0]["sampling/sampling_logp_difference/max"] < 0.05
    for r in rows:
        assert sum(v for k, v in r.items() if k.startswith("stop/")) == pytest.approx(1.0)
        assert r["grad_norm/update_1"] > 0 and r["grad_norm/update_2"] > 0
        assert 0 <= r["rewards/n_ids"] <= 8 and r["rewards/n_ids/std"] >= 0
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_nan_reward_stops_the_run(tmp_path):
    p = load_policy("tiny")
    data, rollout_fn, _ = _toy_setup()
    bad = per_rollout(lambda r, ex: {"reward": float("nan")})
    with pytest.raises(FloatingPointError, match="Step 0"):
        train_grpo(p, data, rollout_fn, bad,
                   GRPOConfig(max_steps=1, num_generations=2, max_completion_length=4),
                   str(tmp_path))


def test_resume_takes_the_same_next_step(tmp_path, capsys):
    data, rollout_fn, reward = _toy_setup()
    cfg = GRPOConfig(max_steps=3, num_generations=2, prompts_per_step=2, max_completion_length=6,
                     learning_rate=1e-2, beta=0.04, save_steps=2, seed=5)

    def run(out, max_steps, resume):
        p = load_policy("tiny", seed=1)     # load_policy seeds torch (LoRA init)
        c = GRPOConfig(**{**cfg.__dict__, "max_steps": max_steps})
        train_grpo(p, data, rollout_fn, reward, c, out, resume=resume)
        return p, [l for l in open(os.path.join(out, "metrics.jsonl"))]

    full, full_log = run(str(tmp_path / "a"), 3, False)
    run(str(tmp_path / "b"), 2, False)                      # "interrupted" after step 2
    assert (tmp_path / "b" / "checkpoint-2" / "trainer_state.pt").exists()
    os.remove(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    # a fresh process: a fresh model and a different torch RNG state, both restored from the
    # checkpoint
    p = load_policy("tiny", seed=1)
    torch.manual_seed(1234)
    capsys.readouterr()
    train_grpo(p, data, rollout_fn, reward, cfg, str(tmp_path / "b"), resume=True)
    assert "resumed from" in capsys.readouterr().out
    import json
    a3 = json.loads(full_log[2])
    b_log = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in b_log] == [0, 1, 2]          # no step logged twice
    b3 = b_log[2]
    for k in ("reward", "loss", "kl", "completion_length"):
        assert a3[k] == pytest.approx(b3[k], rel=1e-5, abs=1e-7), k
    fa, fb = dict(full.model.named_parameters()), dict(p.model.named_parameters())
    for n, q in fa.items():
        if q.requires_grad:
            assert torch.allclose(q, fb[n], atol=1e-6), n


def test_gradient_checkpointing_same_gradients():
    """The GC switch changes memory, not math: the same LoRA gradients with and without it."""
    data, _, _ = _toy_setup()
    grads = []
    for gc in (False, True):
        p = load_policy("tiny", seed=2, gradient_checkpointing=gc)
        assert p.model.get_base_model().model.language_model.gradient_checkpointing is gc
        for n, q in p.model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(q, std=0.1, generator=torch.Generator().manual_seed(0))
        r = run_rollouts(p, data[:1], num_generations=2, make_messages=lambda e: [
            {"role": "user",
             "content": [{"type": "image", "image": e["img"]}, {"type": "text", "text": e["q"]}]}],
            max_new_tokens=5, generate=lambda pol, seqs, **kw: [[5, 6, 7, 8]] * len(seqs))
        p.model.train()
        lp, _ = completion_logprobs(p.model, rollout_batch(r, p.tokenizer))
        lp.sum().backward()
        grads.append([q.grad.clone() for q in p.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_load_is_announced_in_one_line_without_peft_future_warning(capsys, recwarn, tmp_path):
    """One line per model load; peft's `is_gradient_checkpointing` FutureWarning is silenced at its
    source."""
    import warnings
    warnings.simplefilter("always")
    p = load_policy("tiny")
    p.save_adapter(str(tmp_path))
    load_policy("tiny", adapter=str(tmp_path))
    lines = [x for x in capsys.readouterr().out.splitlines()
             if x.startswith("[models] loaded tiny")]
    assert len(lines) == 2 and "fresh LoRA r=8" in lines[0] and f"adapter {tmp_path}" in lines[1]
    assert not [w for w in recwarn.list if "is_gradient_checkpointing" in str(w.message)]


# ------------------------------------------------------------- device-dependent load settings
def _fake_cuda(monkeypatch, name="NVIDIA H100 80GB HBM3", native_bf16=True):
    """torch.cuda as a GPU would answer it, without one: only the queries load_policy resolves
    its settings from (no tensor ever goes to CUDA in these tests). bitsandbytes and peft are
    imported first: on import bitsandbytes picks its backend from torch.cuda.is_available()."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


def test_gradient_checkpointing_auto_is_on_for_cuda(monkeypatch):
    """RunArgs.gradient_checkpointing = None (auto): on for CUDA (one GRPO micro-batch of 8 needs
    ~8 GB with it and ~50 GB without), off for the CPU presets; an explicit choice wins."""
    from common.cli import RunArgs
    from common.models import resolve_gradient_checkpointing
    assert RunArgs().gradient_checkpointing is None
    assert resolve_gradient_checkpointing(None) is False            # no CUDA here
    _fake_cuda(monkeypatch)
    assert resolve_gradient_checkpointing(None) is True
    assert resolve_gradient_checkpointing(None, torch.device("cuda")) is True
    assert resolve_gradient_checkpointing(None, torch.device("cpu")) is False
    assert resolve_gradient_checkpointing(False) is False            # the user turned it off
    assert resolve_gradient_checkpointing(True, torch.device("cpu")) is True
    # on the command line: the bare flag, its --no- form, or a value (none = auto)
    from common.cli import parse_args
    for argv, want in (([], None), (["--gradient_checkpointing"], True),
                       (["--no-gradient_checkpointing"], False),
                       (["--gradient_checkpointing", "false"], False),
                       (["--gradient-checkpointing", "none", "--load_in_4bit"], None)):
        assert parse_args(RunArgs, argv).gradient_checkpointing is want, argv
    assert parse_args(RunArgs, ["--load_in_4bit"]).load_in_4bit is True


def test_compute_dtype_follows_the_device(monkeypatch):
    """bf16 where the GPU has it natively; a GPU without native bf16 (T4 class) is refused in one
    sentence naming the workaround (fp16 would need loss scaling, which the loops do not do)."""
    from common.cli import RunArgs
    from common.errors import UserError
    from common.models import resolve_dtype
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert RunArgs().dtype == "auto"
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype(None, cpu) == torch.float32
    _fake_cuda(monkeypatch)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float32", cuda) == torch.float32
    assert resolve_dtype(torch.float32, cuda) == torch.float32
    _fake_cuda(monkeypatch, "Tesla T4", native_bf16=False)
    with pytest.raises(UserError, match=r"Tesla T4.*bfloat16.*--dtype float32") as e:
        resolve_dtype("auto", cuda)
    assert "\n" not in str(e.value)
    assert resolve_dtype("float32", cuda) == torch.float32
    # load_policy refuses before any model work (nothing here can touch a real GPU)
    with pytest.raises(UserError, match="--dtype float32"):
        load_policy("tiny", device="cuda")


def test_load_line_names_dtype_and_checkpointing(capsys):
    load_policy("tiny")
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[models] loaded")][0]
    assert "float32 (auto: cpu)" in line and "gradient checkpointing off (auto: cpu)" in line
    load_policy("tiny", gradient_checkpointing=True, dtype="float32")
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[models] loaded")][0]
    assert "float32 on cpu," in line and "gradient checkpointing on," in line


def test_full_sft_on_4bit_weights_is_one_sentence():
    """--full_sft with NF4 base weights: a UserError, not torch's "only Tensors of floating point
    dtype can require gradients", and nothing is left half switched on."""
    from common.errors import UserError
    p = load_policy("tiny", load_in_4bit=True)
    before = {n for n, q in p.model.named_parameters() if q.requires_grad}
    with pytest.raises(UserError, match="4-bit") as e:
        p.train_all_weights()
    assert "\n" not in str(e.value) and "--full_sft" in str(e.value)
    assert {n for n, q in p.model.named_parameters() if q.requires_grad} == before
    assert not p.full_weights


def test_max_pixels_caps_a_real_models_processor(tmp_path):
    """A checkpoint whose processor keeps Qwen's 12.8 MP cap (the published preprocessor_config)
    is loaded with the training cap (1280 * 28 * 28 px): a 2000x1500 image is seen, and encoded,
    at <= max_pixels, seen_size agrees with the processor, and a box in the seen frame crops the
    right part of the original."""
    import json

    from transformers import Qwen2_5_VLForConditionalGeneration

    from common import tools
    from common.models import DEFAULT_MAX_PIXELS, build_tiny_tokenizer, tiny_config
    tok = build_tiny_tokenizer()
    Qwen2_5_VLForConditionalGeneration(tiny_config(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    image_processor_for().save_pretrained(tmp_path)
    cfg_path = tmp_path / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("size", None)
    cfg.update(min_pixels=3136, max_pixels=12845056)      # Qwen2.5-VL-3B/7B-Instruct's file
    cfg_path.write_text(json.dumps(cfg))
    assert DEFAULT_MAX_PIXELS == 1280 * 28 * 28
    img = Image.new("RGB", (2000, 1500), (20, 60, 200))
    img.paste((255, 0, 0), (1500, 1125, 2000, 1500))      # the bottom-right quarter is red
    saved = tools._PROCESSOR
    try:
        p = load_policy(str(tmp_path), lora=False)
        w, h = tools.seen_size(img)
        assert w * h <= DEFAULT_MAX_PIXELS and (w, h) == (1148, 840)
        grid = p.image_processor(images=[img], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert (w, h) == (grid[2] * 14, grid[1] * 14)
        out, msg = tools.crop(img, [w * 3 // 4, h * 3 // 4, w, h], seen_size=(w, h))
        assert abs(out.width - 500) <= 2 and abs(out.height - 375) <= 2, msg
        inner = np.asarray(out)[3:-3, 3:-3].reshape(-1, 3)
        assert (inner == [255, 0, 0]).all(axis=1).mean() > 0.99
        p = load_policy(str(tmp_path), lora=False, max_pixels=None)   # none: the file's own cap
        assert tools.seen_size(img)[0] * tools.seen_size(img)[1] > 2_000_000
    finally:
        tools.set_image_processor(saved)


def test_tiny_preset_images_below_the_cap_unchanged():
    """The tiny preset already used the library's 1280 * 28 * 28 cap: its processor and what it
    sees of images under the cap do not change."""
    from common.tools import resize_limits, seen_size
    p = load_policy("tiny")
    assert resize_limits(p.image_processor) == {"min_pixels": 3136, "max_pixels": 1003520,
                                                "factor": 28}
    for size in [(448, 448), (56, 56), (1000, 700), (30, 500)]:
        img = Image.new("RGB", size)
        assert seen_size(img, p.image_processor) == seen_size(img, max_pixels=12845056)
    grid = p.image_processor(images=[Image.new("RGB", (448, 448))],
                             return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 32, 32]]


def test_run_options_pass_every_model_flag(capsys):
    """A script's RunArgs -> load_policy: the new flags (dtype, image range) reach the load."""
    from common.cli import RunArgs, parse_args
    from common.models import run_options
    from common import tools
    args = parse_args(RunArgs, ["--model", "tiny", "--dtype", "float32", "--max_pixels",
                                str(256 * 28 * 28), "--gradient_checkpointing"])
    saved = tools._PROCESSOR
    try:
        p = load_policy(args.model, **run_options(args))
    finally:
        tools.set_image_processor(saved)
    assert tools.resize_limits(p.image_processor)["max_pixels"] == 256 * 28 * 28
    assert p.extra["gradient_checkpointing"] and p.extra["dtype"] == "torch.float32"
    assert "float32 on cpu, gradient checkpointing on," in capsys.readouterr().out
