"""Drawing for the toy worlds: emblem cards and busy backgrounds, pure functions of their
arguments (and of the `random.Random` they are given), so a world drawn twice is identical.

    img = busy_background(rng, 448)
    img.paste(draw_tile(110, (214, 39, 40), "circle", "KOV"), (12, 40))
"""
from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "diamond")


def draw_tile(size: int, color: tuple, shape: str, label: str, filled: bool = True) -> Image.Image:
    """A card: an emblem shape (one of SHAPES) in the top 3/5, a large black label below; an
    unfilled emblem is only its outline."""
    tile = Image.new("RGB", (size, size), (250, 250, 246))
    d = ImageDraw.Draw(tile)
    d.rectangle([0, 0, size - 1, size - 1], outline=(30, 30, 30), width=max(1, size // 32))
    m, top = size // 6, size * 0.58
    box = [m, m // 2, size - m, top]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    fill = color if filled else None
    if shape == "circle":
        d.ellipse(box, fill=fill, outline=color, width=2)
    elif shape == "square":
        d.rectangle(box, fill=fill, outline=color, width=2)
    else:
        pts = ([(cx, box[1]), (box[2], box[3]), (box[0], box[3])] if shape == "triangle"
               else [(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)])
        d.polygon(pts, fill=fill, outline=color, width=2)
    font = ImageFont.load_default(size=max(8, size // 3))
    d.text((size / 2, (top + size) / 2), label, fill=(0, 0, 0), font=font, anchor="mm")
    return tile


def busy_background(rng: random.Random, size: int, n_blobs: int = 12) -> Image.Image:
    """A muted square background with darker blobs (clutter that is not an emblem)."""
    base = tuple(rng.randint(150, 215) for _ in range(3))
    img = Image.new("RGB", (size, size), base)
    d = ImageDraw.Draw(img)
    for _ in range(n_blobs):
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(8, size // 5)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(max(0, c - rng.randint(10, 50)) for c in base))
    return img
