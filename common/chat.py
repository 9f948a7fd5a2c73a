"""Messages (text and PIL images) -> model inputs, with the assistant-token loss mask.

A message is `{"role": ..., "content": str | [{"type": "image", "image": PIL.Image},
{"type": "text", "text": str}, ...]}` (Hugging Face's format). An assistant message may carry
`"train": False` to keep it out of the loss (e.g. a prefilled or copied turn).

Qwen2.5-VL: each image becomes `pixel_values` rows (one per 14x14 patch, t = 2 frames) and
`image_grid_thw = (1, h/14, w/14)`; the chat template renders one `<|image_pad|>` per image,
which we expand to grid_t * grid_h * grid_w / merge_size**2 copies, exactly as
`Qwen2_5_VLProcessor.__call__` does (Qwen2.5-VL, arXiv 2502.13923). We tokenise the un-expanded
text once with offsets, mark assistant tokens, then expand the pad ids (mask 0), so the loss
mask and the image tokens never disagree.

The mask for assistant message i spans render(messages[:i], add_generation_prompt=True) to
render(messages[:i+1]): the reply and its end-of-turn token (the model must learn to stop),
not the "<|im_start|>assistant\\n" header nor the newline after <|im_end|>.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]                   # 1 = a token the loss sees
    images: list = field(default_factory=list)
    pixel_values: torch.Tensor | None = None   # (sum_i t*h*w patches, 1176) for Qwen2.5-VL
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3)


def images_in(messages: list[dict]) -> list:
    return [c["image"] for m in messages if not isinstance(m["content"], str)
            for c in m["content"] if c.get("type") == "image"]


def flatten(messages: list[dict]) -> list[dict]:
    """List content -> plain string (text-only chat templates expect strings)."""
    out = []
    for m in messages:
        if not isinstance(m["content"], str):
            if any(c.get("type") == "image" for c in m["content"]):
                raise ValueError("This model is text-only but a message holds an image; use a "
                                 "vision-language model (tiny, Qwen/Qwen2.5-VL-3B-Instruct).")
            m = dict(m, content="".join(c.get("text", "") for c in m["content"]))
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
           **template_kw) -> str:
    """The chat template's text (one <|image_pad|> per image for VL templates)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if "image_pad" not in (tokenizer.chat_template or ""):
        msgs = flatten(msgs)
    return tokenizer.apply_chat_template(msgs, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kw)


def process_images(image_processor,
                   images: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """PIL images -> (pixel_values (N_patches, 1176), image_grid_thw (n_images, 3))."""
    if not images:
        return None, None
    if image_processor is None:
        raise ValueError("Images were given to a text-only model; use a vision-language model.")
    out = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def image_token_counts(image_grid_thw: torch.Tensor | None, merge_size: int = 2) -> list[int]:
    if image_grid_thw is None:
        return []
    return [int(t * h * w) // merge_size ** 2 for t, h, w in image_grid_thw.tolist()]


def expand_image_pads(ids: list[int], mask: list[int], pad_id: int, counts: list[int]):
    """Replace the k-th <|image_pad|> with counts[k] copies (mask 0)."""
    out_ids, out_mask, k = [], [], 0
    for i, m in zip(ids, mask):
        if i == pad_id:
            if k >= len(counts):
                raise ValueError(f"The text has more <|image_pad|> tokens than the {len(counts)} "
                                 f"images given.")
            out_ids += [pad_id] * counts[k]
            out_mask += [0] * counts[k]
            k += 1
        else:
            out_ids.append(i)
            out_mask.append(m)
    if k != len(counts):
        raise ValueError(f"{len(counts)} images were given but the text has {k} <|image_pad|> "
                         f"tokens.")
    return out_ids, out_mask


def assistant_spans(tokenizer, messages: list[dict], text: str,
                    **template_kw) -> list[tuple[int, int]]:
    """Character spans of the trainable assistant replies inside `text`."""
    spans, eos = [], tokenizer.eos_token
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("train", True) is False:
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True, **template_kw))
        upto = render(tokenizer, messages[: i + 1], **template_kw)
        if not text.startswith(upto) or len(upto) < start:
            raise ValueError("The chat template is not prefix-stable (a later turn rewrites an "
                             "earlier one), so assistant masks cannot be cut from it.")
        end = len(upto)
        cut = upto.rfind(eos, start, end)   # keep <|im_end|>, drop the newline after it
        spans.append((start, cut + len(eos) if cut >= 0 else end))
    return spans


def encode(tokenizer, image_processor, messages: list[dict], *, add_generation_prompt: bool = False,
           merge_size: int = 2, **template_kw) -> Encoded:
    """Tokenise a conversation; loss_mask is 1 on trainable assistant tokens only."""
    text = render(tokenizer, messages, add_generation_prompt, **template_kw)
    spans = assistant_spans(tokenizer, messages, text, **template_kw)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
    images = images_in(messages)
    pixel_values, grid = process_images(image_processor, images)
    ids = enc["input_ids"]
    if image_processor is not None:
        pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        ids, mask = expand_image_pads(ids, mask, pad_id, image_token_counts(grid, merge_size))
    return Encoded(ids, mask, images, pixel_values, grid)


def encode_text(tokenizer, text: str, train: bool = True) -> Encoded:
    """Raw text with no chat template (e.g. cot_causal's T-only paradigm)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Encoded(ids, [int(train)] * len(ids))


def collate(batch: list[Encoded], pad_id: int, padding_side: str = "right",
            image_token_id: int | None = None) -> dict:
    """Pad to a batch: input_ids, attention_mask, loss_mask (B, L) and the images, in order.

    With images, also `mm_token_type_ids` (1 on image tokens): transformers 5 computes Qwen2.5-VL's
    3-D mrope positions only when it is given, and silently falls back to 1-D positions otherwise.
    """
    L = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)  # (B, L)
    attn = torch.zeros(len(batch), L, dtype=torch.long)
    loss_mask = torch.zeros(len(batch), L, dtype=torch.long)
    for b, e in enumerate(batch):
        n = len(e.input_ids)
        sl = slice(0, n) if padding_side == "right" else slice(L - n, L)
        ids[b, sl] = torch.tensor(e.input_ids)
        attn[b, sl] = 1
        loss_mask[b, sl] = torch.tensor(e.loss_mask)
    out = dict(input_ids=ids, attention_mask=attn, loss_mask=loss_mask)
    pv = [e.pixel_values for e in batch if e.pixel_values is not None]
    if pv:
        out["pixel_values"] = torch.cat(pv)
        out["image_grid_thw"] = torch.cat([e.image_grid_thw for e in batch
                                           if e.image_grid_thw is not None])
        if image_token_id is None:
            raise ValueError("collate() needs image_token_id for a batch with images.")
        out["mm_token_type_ids"] = (ids == image_token_id).long()
    return out
