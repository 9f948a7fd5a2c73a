"""The toy visual-search world of gog.py (GoG, arXiv 2601.13942, deviation 1), which prm_bench.py
draws its scenes from too: entities with an emblem (colour x shape), a 3-letter label, a founding year
and a city; scenes of 2 (sparse) or 5 (cluttered) emblem tiles plus grey distractors on a 4 x 4 grid;
a text KB (each entity's year and city), an image KB (each emblem, and each scene as a "photo" of an
event in a town) and four questions per scene, one per GoG decision: glance (read the tile), text
(search the named entity), image (search the whole photo), gaze (crop the tile, search with the crop,
then search its text). Test scenes show only test entities: nothing held out reaches training data.

    world = build_world(seed=0, n_scenes=8, image_size=448)     # a pure function of its arguments
    text_search, image_search = world.searchers("train")        # training-time engines: train rows only
    save_world(world, "runs/gog/data")                          # PNGs + JSONL a person can open

prm_bench.py builds its step-labelled toy trajectories on the same world with the step builders at
the end of this file (Toy, TOY_BUILDERS); its ERRORS table and labelling rule stay in the script.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from common.benchmarks.prm_bench import prm_step
from common.errors import UserError
from common.standins.draw import COLORS, SHAPES, draw_scene, draw_tile, invent
from common.judge import normalize_answer
from common.runlog import RunLog
from common.tools import Grammar, ImageSearch, TextSearch, crop, parse_action, seen_size

CITIES = "Velmor Quenby Arlath Dunmere Sorvik Halden Mirask Tobrin Elsk Caravo".split()
EVENTS = "Fair Market Parade Expo Festival Summit Regatta Carnival".split()
ADJECTIVES = "Amber Silver Northern Winter Harbour Lantern Copper Meadow".split()
CLUTTER = {"sparse": (2, 1), "cluttered": (5, 3)}   # entity tiles, grey distractor tiles per scene
FACTS = {"year": "In which year was {} founded?", "city": "In which city is {} based?"}
KINDS = ("glance", "text", "image", "gaze")   # the questions of each scene, one per GoG decision
KB_TEXT = {"year": "{} was founded in {}.", "city": "{} is based in the city of {}."}   # the text KB's facts


@dataclass
class World:
    scenes: list[dict]      # {"id", "image", "split", "clutter", "place", "tiles": [{"name", "label", "box",
                            #  "cell", "color", "shape", "is_distractor"}]}
    questions: list[dict]   # {"id", "scene_id", "split", "kind", "question", "answers", "target", ...}
    text_kb: list[dict]     # {"id", "text", "entity", "split"}
    image_kb: list[dict]    # {"image", "name", "caption", "split"}
    entities: list[dict] = field(default_factory=list)  # {"name", "label", "color", "shape", "year", ...}
    _engines: dict = field(default_factory=dict, repr=False)

    def searchers(self, split: str = "test") -> tuple[TextSearch, ImageSearch]:
        """Training-time engines ("train") index only training entities and scenes, so no test entity
        reaches SFT or RL data; at test time they index everything."""
        if split not in self._engines:
            keep = {"train"} if split == "train" else {"train", "test"}
            texts = [d for d in self.text_kb if d["split"] in keep]
            images = [e for e in self.image_kb if e["split"] in keep]
            self._engines[split] = (TextSearch(texts), ImageSearch(images))
        return self._engines[split]

    def scene(self, scene_id: str) -> dict:
        return next(s for s in self.scenes if s["id"] == scene_id)

    def example(self, q: dict) -> dict:
        """A question with its scene image and target tile box (original pixels), ready for rollouts."""
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


def scene_questions(rng: random.Random, sid: str, split: str, clutter: str, picks: list[dict], place: str):
    """One question of each kind: glance (read the tile), text (entity named), image (the photo's
    place), gaze (the organisation behind a tile: crop -> image search -> text search)."""
    e, g = picks[0], picks[-1]
    attr, fact_g, fact_e = rng.choice(["color", "shape"]), rng.choice(list(FACTS)), rng.choice(list(FACTS))
    word = "colour" if attr == "color" else "shape"
    behind = f"the organisation whose emblem is on the tile labelled {e['label']}"
    qs = [("glance", f"What {word} is the emblem on the tile labelled {e['label']}?", e[attr], e, attr),
          ("text", FACTS[fact_g].format(g["name"]), g[fact_g], g, fact_g),
          ("image", "In which town was this photo taken?", place, None, "place"),
          ("gaze", FACTS[fact_e].format(behind), e[fact_e], e, fact_e)]
    return [{"id": f"{sid}-{kind}", "scene_id": sid, "split": split, "clutter": clutter, "kind": kind,
             "question": q, "answers": [a], "fact": f, "label": t["label"] if t else None,
             "entity": t["name"] if t else None, "target": t["name"] if kind in ("glance", "gaze") else None}
            for kind, q, a, t, f in qs]


def build_world(seed: int, n_scenes: int = 8, image_size: int = 448, test_frac: float = 0.25) -> World:
    """The toy world, a pure function of its arguments. Test scenes (the last test_frac) show only
    test entities. Text KB: each entity's founding year and city. Image KB: each entity's tile and
    each whole scene (its "photo": the town, and the emblems on display, not where they are)."""
    rng, used = random.Random(seed), set()
    entities = make_entities(rng, used, test_frac)
    n_test = max(1, round(n_scenes * test_frac))
    if n_test >= n_scenes:
        raise UserError(f"--test_frac {test_frac} leaves no training scene of {n_scenes}; use more --n_scenes.")
    text_kb = [{"id": f"{e['name']}-{f}", "text": t.format(e["name"], e[f]), "entity": e["name"],
                "split": e["split"]} for e in entities for f, t in KB_TEXT.items()]
    side = image_size // 4 - 2   # a tile nearly fills its grid cell, so a crop of the cell is a crop of the tile
    image_kb = [{"image": draw_tile(side, COLORS[e["color"]], e["shape"], e["label"]), "name": e["name"],
                 "caption": f"The emblem of {e['name']}.", "split": e["split"]} for e in entities]
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
        scenes.append({"id": sid, "image": img, "tiles": tiles, "split": split, "clutter": clutter, "place": place})
        questions += scene_questions(rng, sid, split, clutter, picks, place)
    return World(scenes, questions, text_kb, image_kb, entities)


def to_seen(box: list[int], image: Image.Image) -> list[int]:
    """Original pixels -> pixels of the resized image the model sees (Qwen2.5-VL bbox_2d)."""
    w, h = seen_size(image)
    return [round(v * s) for v, s in zip(box, (w / image.width, h / image.height) * 2)]


def save_world(world: World, folder: str) -> dict:
    """The world as files a person can open: images/<scene id>.png, toy_train.jsonl and toy_test.jsonl
    (questions, each naming its image file), text_kb.jsonl, and summary.json (the counts, returned)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for s in world.scenes:
        s["image"].save(os.path.join(folder, "images", f"{s['id']}.png"))
    log = RunLog(folder)
    for split in ("train", "test"):
        log.samples([dict(q, image=f"images/{q['scene_id']}.png") for q in world.questions if q["split"] == split],
                    f"toy_{split}.jsonl")
    log.samples(world.text_kb, "text_kb.jsonl")
    counts = {"scenes": len(world.scenes), **{f"{s}_questions": sum(q["split"] == s for q in world.questions)
                                              for s in ("train", "test")},
              "kinds": {k: sum(q["kind"] == k for q in world.questions) for k in KINDS},
              "entities": {s: sum(e["split"] == s for e in world.entities) for s in ("train", "test")},
              "text_kb": len(world.text_kb), "image_kb": len(world.image_kb)}
    log.summary(counts)
    return counts


def by_kind(questions: list[dict], accs: list[float]) -> dict:
    """Accuracy in % per question kind and, for gaze questions, per clutter (None when there are none)."""
    cells = {kind: [a for q, a in zip(questions, accs) if q["kind"] == kind] for kind in KINDS}
    for c in CLUTTER:
        cells[f"gaze/{c}"] = [a for q, a in zip(questions, accs) if q["kind"] == "gaze" and q["clutter"] == c]
    return {k: 100 * float(np.mean(v)) if v else None for k, v in cells.items()}


# =============================================================================================
# prm_bench.py's toy set: step builders on this world. prm_bench's ERRORS table says which error
# each step role may carry and its toy_trajectory labels the steps; each builder appends one step.
# =============================================================================================
def tag(t: dict) -> str:
    """How a question names a tile: gog.py draws a 3-letter label on each (else its name)."""
    return t.get("label") or t["name"]


def direction(a: list, b: list) -> str:
    """Where box b lies from box a, by the dominant axis of their centres."""
    dx, dy = (b[0] + b[2] - a[0] - a[2]) / 2, (b[1] + b[3] - a[1] - a[3]) / 2
    if abs(dx) >= abs(dy):
        return "to the right of" if dx > 0 else "to the left of"
    return "below" if dy > 0 else "above"


def union_box(boxes: list, size: tuple, pad: int = 4) -> list:
    return [max(0, min(b[0] for b in boxes) - pad), max(0, min(b[1] for b in boxes) - pad),
            min(size[0], max(b[2] for b in boxes) + pad), min(size[1], max(b[3] for b in boxes) + pad)]


def other(pool: list, gold: str, rng: random.Random) -> str:
    """A value from `pool` that differs from `gold` (normalised)."""
    choices = sorted({p for p in pool if normalize_answer(p) != normalize_answer(gold)})
    if not choices:
        raise ValueError(f"cannot make a wrong value for {gold!r}: the pool {pool} has no other value.")
    return rng.choice(choices)


def entity_facts(world, name: str | None) -> list[str]:
    return [d["text"] for d in world.text_kb if d["entity"] == name]


def entity_fact(world, name: str, fact: str) -> str:
    """The entity's founding year or city, read from its KB sentences (what the PRM is shown)."""
    pattern = r"\b(\d{4})\b" if fact == "year" else r"city of ([A-Z]\w+)"
    return next(m.group(1) for t in entity_facts(world, name) if (m := re.search(pattern, t)))


@dataclass
class Toy:
    """A toy trajectory being built, and what its steps have claimed so far."""
    spec: dict
    world: World
    rng: random.Random
    grammar: Grammar                            # prm_bench's tags (its crop tool call and <answer>)
    steps: list = field(default_factory=list)
    crops: dict = field(default_factory=dict)   # step index -> the crop it made
    view: list = field(default_factory=list)    # tiles in the latest crop
    seen: dict = field(default_factory=dict)    # tile name -> (colour, shape) as a step described it
    value: str = ""                             # what the steps carry to the answer
    name: str | None = None                     # the entity the perception step named (fact kind)

    def say(self, text: str, error: str | None, **fields) -> None:
        self.steps.append({**prm_step(text, "incorrect" if error else "correct", error), **fields})

    def pool(self, key: str) -> list[str]:
        return sorted({t[key] for s in self.world.scenes for t in s["tiles"]})


def crop_tiles(t: Toy, wrong: bool) -> list[dict]:
    """The tiles a correct crop must hold, or (region_selection) those of a crop that misses the evidence
    and changes the answer if trusted."""
    s, tiles = t.spec, t.spec["scene"]["tiles"]
    if not wrong and s["kind"] == "relation":
        return [s["anchor"], s["target"], s["decoy"]]
    if not wrong:
        return tiles if s["kind"] == "count" else [s["target"]]
    if s["kind"] == "count":  # one tile without the asked shape
        return [([x for x in tiles if x["shape"] != s["shape"]] or tiles)[0]]
    rest = [x for x in tiles if x is not s["target"] and (s["kind"] == "attribute" or not x["is_distractor"])]
    if s["kind"] == "attribute":
        return [sorted(rest, key=lambda x: x[s["attr"]] == s["target"][s["attr"]])[0]]
    return [sorted(rest, key=lambda x: entity_fact(t.world, x["name"], s["fact"]) == s["answers"][0])[0]]


def step_plan(t: Toy, err: None) -> None:
    s = t.spec
    if s["kind"] == "count":
        t.say(f"I will zoom in on the region with all the tiles, then count the {s['shape']} emblems.", None)
    elif s["kind"] == "relation":
        t.say(f"I will zoom in on the tile labelled {tag(s['anchor'])} and the tile {s['rel']} it.", None)
    else:
        then = "recall a fact about its organisation" if s["kind"] == "fact" else "read its emblem"
        t.say(f"I will zoom in on the tile labelled {tag(s['target'])}, then {then}.", None)


def step_crop(t: Toy, err: str | None, text: str = "Zoom in on that region.") -> None:
    """A crop through the shared tool (common.tools); tool_invocation breaks the call itself."""
    image = t.spec["scene"]["image"]
    tiles = crop_tiles(t, wrong=err == "region_selection")
    (w, h), seen = seen_size(image), to_seen(union_box([x["box"] for x in tiles], image.size), image)
    breaks = ["reversed", "three_numbers", "unknown_tool", "outside"]
    broken = t.rng.choice(breaks) if err == "tool_invocation" else ""
    box = {"reversed": seen[2:] + seen[:2], "three_numbers": seen[:3],
           "outside": [w + 10, h + 10, w + 60, h + 60]}
    name = "zoom" if broken == "unknown_tool" else "crop"
    call = {"name": name, "arguments": {"bbox_2d": box.get(broken, seen)}}
    action = parse_action(f"<tool_call>{json.dumps(call)}</tool_call>", t.grammar)
    out, obs = (None, action.error) if action.kind == "error" else crop(image, action.args["bbox_2d"], (w, h))
    t.say(text, err, tool_call=call, observation=obs)
    if out is not None:
        t.crops[len(t.steps) - 1], t.view = out, tiles


def step_retry(t: Toy, err: str) -> None:
    """A recovery: the step after a broken call or a wrong crop notices it and crops again (correct)."""
    if err == "tool_invocation":
        text = "The tool call failed; I retry it with a valid box."
    elif t.spec["kind"] == "count":
        text = "This view holds only part of the tiles; I zoom out to all of them."
    else:
        text = f"This view does not show the tile labelled {tag(t.spec['target'])}; I zoom in on it instead."
    step_crop(t, None, text)


def step_perceive(t: Toy, err: str | None) -> None:
    s, kind, rng = t.spec, t.spec["kind"], t.rng
    t.seen = {x["name"]: (x["color"], x["shape"]) for x in t.view}
    if kind in ("attribute", "fact"):
        x = t.view[0]
        (c, sh), t.name = t.seen[x["name"]], None if x["is_distractor"] else x["name"]
        if err and kind == "attribute":  # misread the asked attribute
            if s["attr"] == "color":
                c = other(t.pool("color"), c, rng)
            else:
                sh = other(t.pool("shape"), sh, rng)
        elif err:  # take the emblem for another entity's
            e = rng.choice([y for sc in t.world.scenes for y in sc["tiles"] if not y["is_distractor"]
                            and y["name"] != x["name"]])
            c, sh, t.name = e["color"], e["shape"], e["name"]
        t.value = {"color": c, "shape": sh}[s.get("attr", "color")]
        if kind == "fact":
            t.say(f"The zoomed view shows a {c} {sh} emblem, the emblem of {t.name}.", err,
                  knowledge=[f"The emblem of {t.name} is a {c} {sh}."])
        else:
            t.say(f"The zoomed view shows a {c} {sh} emblem.", err)
        return
    if err:  # misread the target's colour (relation) or one tile's shape, which changes the count (count)
        x = s["target"] if kind == "relation" else rng.choice(t.view)
        c, sh = t.seen[x["name"]]
        t.seen[x["name"]] = (other(t.pool("color"), c, rng), sh) if kind == "relation" else \
            (c, other(t.pool("shape"), sh, rng) if sh == s["shape"] else s["shape"])
    parts = [f"a tile labelled {tag(x)} ({' '.join(t.seen[x['name']])})" for x in t.view]
    if kind == "relation":
        parts = parts[:1] + rng.sample(parts[1:], 2)
    t.say("The zoomed view shows " + ", ".join(parts) + ".", err)


def step_relate(t: Toy, err: str | None) -> None:
    s = t.spec
    pick = s["decoy"] if err else s["target"]
    t.value = t.seen[pick["name"]][0]
    t.say(f"The tile labelled {tag(pick)} is {s['rel']} the tile labelled {tag(s['anchor'])}.", err)


def step_recall(t: Toy, err: str | None) -> None:
    fact, facts = t.spec["fact"], entity_facts(t.world, t.name)
    true = entity_fact(t.world, t.name, fact)
    pool = [entity_fact(t.world, d["entity"], fact) for d in t.world.text_kb]
    t.value = other(pool, true, t.rng) if err else true
    verb = "was founded in" if fact == "year" else "is based in the city of"
    t.say(f"I recall that {t.name} {verb} {t.value}.", err, knowledge=facts)


def step_count(t: Toy, err: str | None) -> None:
    hits = [tag(x) for x in t.view if t.seen[x["name"]][1] == t.spec["shape"]]
    n = len(hits) + ((1 if not hits or t.rng.random() < 0.5 else -1) if err else 0)  # off by one
    t.value = str(n)
    t.say(f"The tiles with a {t.spec['shape']} emblem: {', '.join(hits) or 'none'}; that makes {n}.", err)


def step_answer(t: Toy, err: str | None) -> None:
    if err and t.rng.random() < 0.5:
        t.say(f"The answer is {t.value}.", err)
        return
    pool = {"count": [str(i) for i in range(8)], "relation": t.pool("color"),
            "attribute": t.pool(t.spec.get("attr", "color")),
            "fact": [entity_fact(t.world, d["entity"], t.spec.get("fact", "year")) for d in t.world.text_kb]}
    shown = other(pool[t.spec["kind"]], t.value, t.rng) if err else t.value
    t.say(f"So the answer is {t.value}. <answer>{shown}</answer>", err)


TOY_BUILDERS = {"plan": step_plan, "crop": step_crop, "perceive": step_perceive, "relate": step_relate,
            "recall": step_recall, "count": step_count, "answer": step_answer}
