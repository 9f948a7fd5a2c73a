"""prm_bench.py's toy step builders (its deviation 1: a toy set on gog.py's toy world).

Each builder appends one step of prm_bench's record (prm_step) to a Toy trajectory: a plan, a
crop through the shared tool, a perception, a relation, a recalled fact, a count, the answer. A
builder given an error type does that step wrong in that way; which error fits which step
(ERRORS) and which steps a trajectory gets (toy_trajectory, its labelling rule) stay in
prm_bench.py. The published benchmarks' converters (common/benchmarks/prm_bench.py) build their
steps with prm_step too. The world itself is common/standins/toyworld.py.

    t = Toy(spec, world, rng, GRAMMAR)      # spec: one of prm_bench.toy_questions(world, rng)
    for role in ("plan", "crop", "perceive", "answer"):
        TOY_BUILDERS[role](t, None)         # or an error type: the step is wrong and labelled so
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

from common.judge import normalize_answer
from common.standins.toyworld import World, to_seen
from common.tools import Grammar, crop, parse_action, seen_size


def prm_step(text, label: str | None, error_type: str | None = None) -> dict:
    """One step of a prm_bench.py record."""
    return {"text": str(text), "tool_call": None, "observation": None, "tool_image": None,
            "knowledge": None, "label": label, "error_type": error_type}


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
            min(size[0], max(b[2] for b in boxes) + pad),
            min(size[1], max(b[3] for b in boxes) + pad)]


def other(pool: list, gold: str, rng: random.Random) -> str:
    """A value from `pool` that differs from `gold` (normalised)."""
    choices = sorted({p for p in pool if normalize_answer(p) != normalize_answer(gold)})
    if not choices:
        raise ValueError(f"cannot make a wrong value for {gold!r}: the pool {pool} has no other "
                         "value.")
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
    seen: dict = field(default_factory=dict)    # tile -> (colour, shape) as a step described it
    value: str = ""                             # what the steps carry to the answer
    name: str | None = None                     # the entity the perception step named (fact kind)

    def say(self, text: str, error: str | None, **fields) -> None:
        self.steps.append({**prm_step(text, "incorrect" if error else "correct", error), **fields})

    def pool(self, key: str) -> list[str]:
        return sorted({t[key] for s in self.world.scenes for t in s["tiles"]})


def crop_tiles(t: Toy, wrong: bool) -> list[dict]:
    """The tiles a correct crop must hold, or (region_selection) those of a crop that misses the
    evidence and changes the answer if trusted."""
    s, tiles = t.spec, t.spec["scene"]["tiles"]
    if not wrong and s["kind"] == "relation":
        return [s["anchor"], s["target"], s["decoy"]]
    if not wrong:
        return tiles if s["kind"] == "count" else [s["target"]]
    if s["kind"] == "count":  # one tile without the asked shape
        return [([x for x in tiles if x["shape"] != s["shape"]] or tiles)[0]]
    rest = [x for x in tiles
            if x is not s["target"] and (s["kind"] == "attribute" or not x["is_distractor"])]
    if s["kind"] == "attribute":
        return [sorted(rest, key=lambda x: x[s["attr"]] == s["target"][s["attr"]])[0]]
    return [sorted(rest, key=lambda x: entity_fact(t.world, x["name"], s["fact"])
                   == s["answers"][0])[0]]


def step_plan(t: Toy, err: None) -> None:
    s = t.spec
    if s["kind"] == "count":
        t.say(f"I will zoom in on the region with all the tiles, then count the {s['shape']} "
              "emblems.", None)
    elif s["kind"] == "relation":
        t.say(f"I will zoom in on the tile labelled {tag(s['anchor'])} and the tile {s['rel']} "
              "it.", None)
    else:
        then = "recall a fact about its organisation" if s["kind"] == "fact" else "read its emblem"
        t.say(f"I will zoom in on the tile labelled {tag(s['target'])}, then {then}.", None)


def step_crop(t: Toy, err: str | None, text: str = "Zoom in on that region.") -> None:
    """A crop through the shared tool (common.tools); tool_invocation breaks the call itself."""
    image = t.spec["scene"]["image"]
    tiles = crop_tiles(t, wrong=err == "region_selection")
    region = union_box([x["box"] for x in tiles], image.size)   # original pixels
    (w, h), seen = seen_size(image), to_seen(region, image)
    breaks = ["reversed", "three_numbers", "unknown_tool", "outside"]
    broken = t.rng.choice(breaks) if err == "tool_invocation" else ""
    box = {"reversed": seen[2:] + seen[:2], "three_numbers": seen[:3],
           "outside": [w + 10, h + 10, w + 60, h + 60]}
    name = "zoom" if broken == "unknown_tool" else "crop"
    call = {"name": name, "arguments": {"bbox_2d": box.get(broken, seen)}}
    action = parse_action(f"<tool_call>{json.dumps(call)}</tool_call>", t.grammar)
    out, obs = ((None, action.error) if action.kind == "error"
                else crop(image, action.args["bbox_2d"], (w, h)))
    t.say(text, err, tool_call=call, observation=obs)
    if out is not None:
        t.crops[len(t.steps) - 1], t.view = out, tiles


def step_retry(t: Toy, err: str) -> None:
    """A recovery: the step after a broken call or a wrong crop notices it and crops again
    (correct)."""
    if err == "tool_invocation":
        text = "The tool call failed; I retry it with a valid box."
    elif t.spec["kind"] == "count":
        text = "This view holds only part of the tiles; I zoom out to all of them."
    else:
        text = (f"This view does not show the tile labelled {tag(t.spec['target'])}; I zoom in on "
                "it instead.")
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
            e = rng.choice([y for sc in t.world.scenes for y in sc["tiles"]
                            if not y["is_distractor"] and y["name"] != x["name"]])
            c, sh, t.name = e["color"], e["shape"], e["name"]
        t.value = {"color": c, "shape": sh}[s.get("attr", "color")]
        if kind == "fact":
            t.say(f"The zoomed view shows a {c} {sh} emblem, the emblem of {t.name}.", err,
                  knowledge=[f"The emblem of {t.name} is a {c} {sh}."])
        else:
            t.say(f"The zoomed view shows a {c} {sh} emblem.", err)
        return
    if err:  # misread the target's colour (relation), or one tile's shape so the count changes
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
    t.say(f"The tiles with a {t.spec['shape']} emblem: {', '.join(hits) or 'none'}; that makes "
          f"{n}.", err)


def step_answer(t: Toy, err: str | None) -> None:
    if err and t.rng.random() < 0.5:
        t.say(f"The answer is {t.value}.", err)
        return
    pool = {"count": [str(i) for i in range(8)], "relation": t.pool("color"),
            "attribute": t.pool(t.spec.get("attr", "color")),
            "fact": [entity_fact(t.world, d["entity"], t.spec.get("fact", "year"))
                     for d in t.world.text_kb]}
    shown = other(pool[t.spec["kind"]], t.value, t.rng) if err else t.value
    t.say(f"So the answer is {t.value}. <answer>{shown}</answer>", err)


TOY_BUILDERS = {"plan": step_plan, "crop": step_crop, "perceive": step_perceive,
                "relate": step_relate, "recall": step_recall, "count": step_count,
                "answer": step_answer}
