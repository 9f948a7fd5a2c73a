"""The toy visual-search world of gog.py (GoG, arXiv 2601.13942, deviation 1), which prm_bench.py
draws its scenes from too: entities with an emblem (colour x shape), a 3-letter label, a founding
year and a city; scenes of 2 (sparse) or 5 (cluttered) emblem tiles plus grey distractors on a 4 x 4
grid; a text KB (each entity's year and city), an image KB (each emblem, and each scene as a "photo"
of an event in a town) and four questions per scene, one per GoG decision: glance (read the tile),
text (search the named entity), image (search the whole photo), gaze (crop the tile, search with the
crop, then search its text). Test scenes show only test entities: nothing held out reaches training
data.

    world = build_world(seed=0, n_scenes=8, image_size=448) # a pure function of its arguments
    text_search, image_search = world.searchers("train")    # training-time engines: train rows only
    save_world(world, "runs/gog/data")                      # PNGs + JSONL a person can open

prm_bench.py builds its step-labelled toy trajectories on the same world (its step builders are
common/standins/prm_steps.py).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from common import distributed as dist
from common.errors import UserError
from common.standins.draw import COLORS, SHAPES, draw_scene, draw_tile, invent
from common.runlog import RunLog
from common.tools import ImageSearch, TextSearch, seen_size

CITIES = "Velmor Quenby Arlath Dunmere Sorvik Halden Mirask Tobrin Elsk Caravo".split()
EVENTS = "Fair Market Parade Expo Festival Summit Regatta Carnival".split()
ADJECTIVES = "Amber Silver Northern Winter Harbour Lantern Copper Meadow".split()
CLUTTER = {"sparse": (2, 1), "cluttered": (5, 3)}   # entity tiles, grey distractor tiles per scene
FACTS = {"year": "In which year was {} founded?", "city": "In which city is {} based?"}
KINDS = ("glance", "text", "image", "gaze")   # the questions of each scene, one per GoG decision
# the text KB's facts
KB_TEXT = {"year": "{} was founded in {}.", "city": "{} is based in the city of {}."}


@dataclass
class World:
    # {"id", "image", "split", "clutter", "place",
    #  "tiles": [{"name", "label", "box", "cell", "color", "shape", "is_distractor"}]}
    scenes: list[dict]
    # {"id", "scene_id", "split", "kind", "question", "answers", "target", ...}
    questions: list[dict]
    text_kb: list[dict]     # {"id", "text", "entity", "split"}
    image_kb: list[dict]    # {"image", "name", "caption", "split"}
    # {"name", "label", "color", "shape", "year", ...}
    entities: list[dict] = field(default_factory=list)
    _engines: dict = field(default_factory=dict, repr=False)

    def searchers(self, split: str = "test") -> tuple[TextSearch, ImageSearch]:
        """Training-time engines ("train") index only training entities and scenes, so no test
        entity reaches SFT or RL data; at test time they index everything."""
        if split not in self._engines:
            keep = {"train"} if split == "train" else {"train", "test"}
            texts = [d for d in self.text_kb if d["split"] in keep]
            images = [e for e in self.image_kb if e["split"] in keep]
            self._engines[split] = (TextSearch(texts), ImageSearch(images))
        return self._engines[split]

    def scene(self, scene_id: str) -> dict:
        return next(s for s in self.scenes if s["id"] == scene_id)

    def example(self, q: dict) -> dict:
        """A question with its scene image and target tile box (original pixels),
        ready for rollouts."""
        scene = self.scene(q["scene_id"])
        box = next((t["box"] for t in scene["tiles"] if t["name"] == q["target"]), None)
        return dict(q, image=scene["image"], target_box=box)


def make_entities(rng: random.Random, used: set, test_frac: float) -> list[dict]:
    """One entity per (colour, shape) emblem; the first test_frac of them are test-only."""
    combos = [(c, s) for c in COLORS for s in SHAPES]
    rng.shuffle(combos)
    n_test = max(2, round(len(combos) * test_frac))
    return [dict(name=invent(rng, used, "name"), label=invent(rng, used, "label"), color=c, shape=s,
                 year=str(rng.randint(1820, 2015)), city=rng.choice(CITIES),
                 split="test" if i < n_test else "train") for i, (c, s) in enumerate(combos)]


def scene_questions(rng: random.Random, sid: str, split: str, clutter: str, picks: list[dict],
                    place: str):
    """One question of each kind: glance (read the tile), text (entity named), image (the photo's
    place), gaze (the organisation behind a tile: crop -> image search -> text search)."""
    e, g = picks[0], picks[-1]
    attr = rng.choice(["color", "shape"])
    fact_g, fact_e = rng.choice(list(FACTS)), rng.choice(list(FACTS))
    word = "colour" if attr == "color" else "shape"
    behind = f"the organisation whose emblem is on the tile labelled {e['label']}"
    qs = [("glance", f"What {word} is the emblem on the tile labelled {e['label']}?",
           e[attr], e, attr),
          ("text", FACTS[fact_g].format(g["name"]), g[fact_g], g, fact_g),
          ("image", "In which town was this photo taken?", place, None, "place"),
          ("gaze", FACTS[fact_e].format(behind), e[fact_e], e, fact_e)]
    return [{"id": f"{sid}-{kind}", "scene_id": sid, "split": split, "clutter": clutter,
             "kind": kind, "question": q, "answers": [a], "fact": f,
             "label": t["label"] if t else None, "entity": t["name"] if t else None,
             "target": t["name"] if kind in ("glance", "gaze") else None}
            for kind, q, a, t, f in qs]


def build_world(seed: int, n_scenes: int = 8, image_size: int = 448,
                test_frac: float = 0.25) -> World:
    """The toy world, a pure function of its arguments. Test scenes (the last test_frac) show only
    test entities. Text KB: each entity's founding year and city. Image KB: each entity's tile and
    each whole scene (its "photo": the town, and the emblems on display, not where they are)."""
    rng, used = random.Random(seed), set()
    entities = make_entities(rng, used, test_frac)
    n_test = max(1, round(n_scenes * test_frac))
    if n_test >= n_scenes:
        raise UserError(f"--test_frac {test_frac} leaves no training scene of {n_scenes}; "
                        f"use more --n_scenes.")
    text_kb = [{"id": f"{e['name']}-{f}", "text": t.format(e["name"], e[f]), "entity": e["name"],
                "split": e["split"]} for e in entities for f, t in KB_TEXT.items()]
    # a tile nearly fills its grid cell, so a crop of the cell is a crop of the tile
    side = image_size // 4 - 2
    image_kb = [{"image": draw_tile(side, COLORS[e["color"]], e["shape"], e["label"]),
                 "name": e["name"], "caption": f"The emblem of {e['name']}.", "split": e["split"]}
                for e in entities]
    scenes, questions = [], []
    for k in range(n_scenes):
        sid, clutter = f"scene{k:03d}", list(CLUTTER)[k % 2]
        split = "test" if k >= n_scenes - n_test else "train"
        pool = [e for e in entities if e["split"] == split]
        picks = rng.sample(pool, min(CLUTTER[clutter][0], len(pool)))
        img, tiles = draw_scene(rng, picks, CLUTTER[clutter][1], used, image_size, side)
        event, place = f"{rng.choice(ADJECTIVES)} {rng.choice(EVENTS)}", invent(rng, used, "place")
        names = ", ".join(p["name"] for p in sorted(picks, key=lambda p: p["name"]))
        caption = f"Photo of the {event}, held in {place}; emblems of {names} are on display."
        image_kb.append({"image": img, "name": f"the {event}", "split": split, "caption": caption})
        scenes.append({"id": sid, "image": img, "tiles": tiles, "split": split, "clutter": clutter,
                       "place": place})
        questions += scene_questions(rng, sid, split, clutter, picks, place)
    return World(scenes, questions, text_kb, image_kb, entities)


def to_seen(box: list[int], image: Image.Image) -> list[int]:
    """Original pixels -> pixels of the resized image the model sees (Qwen2.5-VL bbox_2d)."""
    w, h = seen_size(image)
    return [round(v * s) for v, s in zip(box, (w / image.width, h / image.height) * 2)]


def save_world(world: World, folder: str) -> dict:
    """The world as files a person can open: images/<scene id>.png, toy_train.jsonl and
    toy_test.jsonl (questions, each naming its image file), text_kb.jsonl, and summary.json
    (the counts, returned)."""
    if dist.is_main():   # under torchrun rank 0 writes (RunLog below does the same)
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        for s in world.scenes:
            s["image"].save(os.path.join(folder, "images", f"{s['id']}.png"))
    log = RunLog(folder)
    for split in ("train", "test"):
        log.samples([dict(q, image=f"images/{q['scene_id']}.png") for q in world.questions
                     if q["split"] == split], f"toy_{split}.jsonl")
    log.samples(world.text_kb, "text_kb.jsonl")
    counts = {"scenes": len(world.scenes),
              **{f"{s}_questions": sum(q["split"] == s for q in world.questions)
                 for s in ("train", "test")},
              "kinds": {k: sum(q["kind"] == k for q in world.questions) for k in KINDS},
              "entities": {s: sum(e["split"] == s for e in world.entities)
                           for s in ("train", "test")},
              "text_kb": len(world.text_kb), "image_kb": len(world.image_kb)}
    log.summary(counts)
    return counts


def by_kind(questions: list[dict], accs: list[float]) -> dict:
    """Accuracy in % per question kind and, for gaze questions, per clutter (None when there
    are none)."""
    cells = {kind: [a for q, a in zip(questions, accs) if q["kind"] == kind] for kind in KINDS}
    for c in CLUTTER:
        cells[f"gaze/{c}"] = [a for q, a in zip(questions, accs)
                              if q["kind"] == "gaze" and q["clutter"] == c]
    return {k: 100 * float(np.mean(v)) if v else None for k, v in cells.items()}

