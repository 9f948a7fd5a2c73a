"""Drawing and naming for the toy worlds: invented words, emblem cards, busy scenes on a 4 x 4
grid. Pure functions of their arguments (and of the `random.Random` they are given), so a world
drawn twice is identical.

    used = set()
    label = invent(rng, used, "label")                      # e.g. "KOV", never drawn twice
    img, tiles = draw_scene(rng, picks, 3, used, 448, 110)  # picks: {"name", "label", "color",
                                                                      "shape"}
"""
from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 210),
          "yellow": (232, 190, 20), "purple": (148, 73, 189), "orange": (245, 127, 14)}
SHAPES = ("circle", "square", "triangle", "diamond")
SYLLABLES = "ka lo mi ra ven tor zu pel qui sar no bri dax fen gor hal jun mor vi tek".split()


def invent(rng: random.Random, taken: set, kind: str) -> str:
    """A new word of `kind` (name, label: 3 letters, place) not in `taken` (which it joins)."""
    while True:
        s = rng.choice(SYLLABLES).capitalize() + rng.choice(SYLLABLES)
        place = s + rng.choice(["holm", "mere", "wick", "ford", "dale"])
        label = "".join(rng.choice(a) for a in ("BCDFGHJKLMNPRSTVZ", "AEIOU", "BCDFGHJKLMNPRSTVZ"))
        w = {"name": s, "place": place, "label": label}[kind]
        if w not in taken:
            taken.add(w)
            return w


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
        d.ellipse([x - r, y - r, x + r, y + r],
                  fill=tuple(max(0, c - rng.randint(10, 50)) for c in base))
    return img


def draw_scene(rng: random.Random, picks: list[dict], n_distractors: int, used: set, size: int,
               side: int):
    """(image, tiles): the `picks` (dicts with name, label, color, shape) and n_distractors grey
    outline emblems with invented labels, one tile of `side` pixels per cell of a 4 x 4 grid, on a
    busy background. Each tile: {"name", "label", "color", "shape", "is_distractor", "box",
    "cell"}."""
    img, cell, tiles = busy_background(rng, size), size // 4, []
    for j, c in enumerate(rng.sample(range(16), len(picks) + n_distractors)):
        cx, cy = (c % 4) * cell, (c // 4) * cell
        x, y = cx + rng.randint(0, cell - side), cy + rng.randint(0, cell - side)
        if j < len(picks):
            e = picks[j]
            t = dict(name=e["name"], label=e["label"], color=e["color"], shape=e["shape"],
                     is_distractor=False)
        else:  # a distractor: a label that names nothing
            label = invent(rng, used, "label")
            t = dict(name=f"distractor-{label}", label=label, color="grey",
                     shape=rng.choice(SHAPES), is_distractor=True)
        rgb = COLORS.get(t["color"], (110, 110, 110))
        img.paste(draw_tile(side, rgb, t["shape"], t["label"], not t["is_distractor"]), (x, y))
        tiles.append(dict(t, box=[x, y, x + side, y + side], cell=[cx, cy, cx + cell, cy + cell]))
    return img, tiles
