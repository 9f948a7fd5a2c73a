"""am3safety.py's deviations 1, 2 and 12: pictures drawn offline (toy seed pictures and the user's
"new image", MM-SafetyBench-style typographic images) and the text a text-only model gets for an
image. Knows nothing of dialogues, roles or judging.
"""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TONES = {"red": (210, 50, 50), "blue": (50, 80, 210), "green": (40, 160, 70),
         "yellow": (230, 200, 40), "purple": (140, 60, 170), "white": (245, 245, 245),
         "black": (15, 15, 15), "grey": (128, 128, 128), "brown": (120, 80, 40),
         "orange": (240, 140, 30)}


def typographic_image(phrase: str, size: int) -> Image.Image:
    """(1) MM-SafetyBench's TYPO image: the key phrase in black on white, wrapped to the width."""
    im = Image.new("RGB", (size, size), "white")
    font = ImageFont.load_default(size=max(10, size // 10))
    d, lines = ImageDraw.Draw(im), [""]
    for w in phrase.split():
        if lines[-1] and d.textlength(f"{lines[-1]} {w}", font=font) > size * 0.9:
            lines.append("")
        lines[-1] = f"{lines[-1]} {w}".strip()
    d.multiline_text((size * 0.05, size * 0.3), "\n".join(lines), fill="black", font=font)
    return im


def describe_image(im: Image.Image) -> str:
    """(12) What a text-only model is told an image shows: its size and two commonest tones, never a
    file name."""
    px = np.asarray(im.convert("RGB").resize((16, 16)), dtype=np.float32).reshape(-1, 3)  # (256, 3)
    ref = np.array(list(TONES.values()), dtype=np.float32)                                # (C, 3)
    nearest = ((px[:, None] - ref[None]) ** 2).sum(-1).argmin(1)                         # (256,)
    tones = Counter(np.array(list(TONES))[nearest]).most_common(2)
    return f"a {im.width}x{im.height} picture, mostly {' and '.join(str(t) for t, _ in tones)}"


def draw_toy_image(color: str, shape: str, obj: str, size: int, layout: int, jitter: int = 0,
                   zoom: float = 1.0) -> Image.Image:
    """(1, 2) A toy seed picture: the object as a shape of colour `color` (a TONES name), its name
    written under it, and two grey blocks, placed by `layout` (jitter / zoom: a near-copy, a
    close-up)."""
    lr, im = random.Random(layout), Image.new("RGB", (size, size), (235, 235, 230))
    d = ImageDraw.Draw(im)
    for _ in range(2):
        x, y, w = lr.randrange(size), lr.randrange(size), lr.randint(size // 8, size // 3)
        d.rectangle([x, y, x + w, y + w // 2], fill=(90, 90, 90))
    r = int(size * lr.uniform(0.15, 0.25) * zoom)
    cx, cy = lr.randint(r, size - r) + jitter, lr.randint(r, size - r) + jitter
    box, fill = [cx - r, cy - r, cx + r, cy + r], TONES[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    d.text((max(0, cx - r), min(size - 12, cy + r + 1)), obj, fill=(20, 20, 20))
    return im
