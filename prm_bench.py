"""PRM-Bench for thinking with images: a step-labelled benchmark format, trajectory generation
with error injection, LVLM-as-PRM evaluation with the anchors' metrics, and PRM-guided search.
"What, Whether and How? Unveiling Process Reward Models for Thinking with Images Reasoning",
arXiv 2602.08346 (no code or data released).

Stages (each writes into <out>/<stage>/; `all` runs data -> eval -> search):
    python prm_bench.py --stage all --model tiny      # CPU, ~1-2 min: plumbing only, numbers are noise
    python prm_bench.py --stage data     # toy set with injected errors (exact labels) + policy trajectories
    python prm_bench.py --stage eval     # LVLM as PRM: judge every step -> <out>/eval/results.json + plots
    python prm_bench.py --stage search   # PRM-guided best-of-N (min / mean) vs majority vote and random
GPU (Qwen2.5-VL-3B in NF4 as the PRM; Qwen/Qwen2.5-VL-7B-Instruct with 24 GB):
    python prm_bench.py --stage all --model Qwen/Qwen2.5-VL-3B-Instruct --n_scenes 40 --search_questions 40
Your own annotated trajectories (record format below; paths relative to the file):
    python prm_bench.py --stage eval --data my_annotated.jsonl --prm prob --prm_adapter my_prm/adapter

Record format (one trajectory per JSONL line; `validate_record` checks every field):
    {"id": str, "question": str, "images": [path], "answers": [str], "final_answer": str | null,
     "category": one of TAXONOMY, "subcategory": one of TAXONOMY[category], "source": str,
     "injected": null | {"step": int, "error_type": str},          # toy set only
     "steps": [{"text": str, "tool_call": null | {"name": str, "arguments": {...}},
                "observation": str | null, "tool_image": path | null,
                "label": "correct" | "incorrect" | "neutral" (null only in unannotated files),
                "error_type": one of ERROR_TYPES iff label == "incorrect", else null}, ...]}
Boxes in tool calls are pixels of the image the model saw (Qwen2.5-VL `bbox_2d`).

Deviations from the paper (numbered; the code says "(n)" where each one lives):
 1. Data: the 1,206 annotated trajectories are not public. The toy set is built on gog.py's toy
    world (emblem tiles); errors are injected programmatically at known steps, so labels are
    exact. It covers 4 of our 16 subcategories (one per category).
 2. Taxonomy: the paper names only 2 of its 7 error types (tool invocation, relationship
    understanding) and none of its 4 x 16 categories; ERROR_TYPES and TAXONOMY are ours.
 3. Labels after the first injected error are "neutral": those steps may be locally valid but
    rest on a wrong premise. Step metrics exclude neutral steps (VisualProcessBench's rule),
    so PRMBench's PRMScore and VisualProcessBench's macro-F1 coincide on our data.
 4. A reply the judge parser cannot read counts as "not endorsed" (judged incorrect) and is
    reported as `unparsed_rate`; in search its score is 0.
 5. The PRM sees the question images and only the image made by the step being judged (the
    earlier crops are described in text), to keep prompts short on a small GPU.
 6. `--prm prob` scores a step by P("+") / (P("+") + P("-")) of the next token after a "+ or -"
    prompt (the Math-Shepherd / VisualPRM convention for trained PRMs), instead of a trained
    PRM's value head; pass a trained adapter with --prm_adapter.
 7. Search: "policy" candidates come from the model with the crop tool; the default "toy"
    candidates come from a simulated policy (the toy generator with random injected errors),
    because the tiny model answers nothing. Nothing is trained here, so there is no sft/rl stage
    and no GRPO knobs; --max_steps caps the trajectories judged in eval.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from common.chat import collate, encode
from common.cli import RunArgs, UserError, run_stages
from common.data import open_image, read_records
from common.judge import exact_match, normalize_answer, parse_verdict
from common.models import load_policy
from common.rollout import image_token_id, run_rollouts
from common.runlog import RunLog, bar_plot, trajectory_html, write_json
from common.tools import crop, parse_action, seen_size
from gog import World, build_world, to_seen


@dataclass
class Args(RunArgs):
    stage: Literal["data", "eval", "search", "all"] = "all"
    """which stage to run (`all` = data, eval, search)"""
    # --- data (1) ---
    data: str | None = None
    """annotated JSONL to evaluate (default: <out>/data/toy.jsonl from the data stage)"""
    n_scenes: int = 6
    """scenes of gog.py's toy world; each gives 4 toy questions (attribute, fact, relation, count)"""
    image_size: int = 448
    """scene side in pixels (the tiny preset: 224, 8x fewer vision tokens on a CPU)"""
    p_clean: float = 0.3
    """fraction of toy trajectories left error-free (the others get one injected error)"""
    n_policy_questions: int = 4
    """questions the policy answers with the crop tool in the data stage (0 = skip)"""
    num_generations: int = 2
    """trajectories the policy samples per question"""
    max_turns: int = 3
    """assistant turns (= steps) per policy trajectory"""
    max_completion_length: int = 48
    """new tokens per policy turn"""
    temperature: float = 1.0
    """policy sampling temperature"""
    # --- eval: LVLM as PRM ---
    max_steps: int = 0
    """cap on trajectories judged in eval (0 = all); nothing is trained here (7)"""
    prm: Literal["judge", "prob"] = "judge"
    """judge = prompted Correct/Incorrect verdict; prob = P(+) / (P(+) + P(-)) next-token score (6)"""
    prm_adapter: str | None = None
    """peft adapter of a trained PRM loaded onto --model (none = the base model as PRM)"""
    threshold: float = 0.5
    """a step is judged correct when its score >= threshold"""
    judge_max_new_tokens: int = 8
    """tokens the judge may write (the verdict is the earliest Correct/Incorrect in them)"""
    batch_size: int = 16
    """PRM prompts per batch"""
    n_buckets: int = 4
    """relative step-position buckets for accuracy by position"""
    n_html: int = 12
    """trajectories shown on the HTML pages"""
    # --- search ---
    search_source: Literal["toy", "policy"] = "toy"
    """candidates: toy = simulated policy with injected errors; policy = the model with its crop tool (7)"""
    search_questions: int = 4
    """questions in the search stage"""
    search_n: str = "1,2,4,8"
    """N values for best-of-N; the largest is the candidates sampled per question"""
    search_p_clean: float = 0.35
    """toy source: chance that a simulated candidate is error-free"""
    search_repeats: int = 64
    """random N-subsets of the candidates per question (selection noise is averaged out)"""


# =============================================================================================
# Data: taxonomy (2), record format + validator, loaders, toy set with injected errors (1)
# =============================================================================================
ERROR_TYPES = {  # ours (2); the paper names only the first and the fourth
    "tool_invocation": "a malformed or invalid tool call (bad JSON, unknown tool, impossible box)",
    "region_selection": "a valid crop of the wrong region: the evidence is not in the view",
    "visual_perception": "misreading what the image or crop shows (colour, shape, label)",
    "relationship_understanding": "a wrong spatial or semantic relation between objects",
    "knowledge_hallucination": "a wrong or invented fact about a recognised entity",
    "logical_calculation": "a wrong inference or arithmetic from correct premises",
    "answer_format": "the final answer contradicts the reasoning or breaks the <answer> format",
}
TAXONOMY = {  # ours (2): 4 categories x 4 subcategories = 16
    "perception": ("attribute", "text_reading", "small_object", "fine_detail"),
    "spatial": ("relative_position", "layout", "size_comparison", "orientation"),
    "knowledge": ("entity_recognition", "fact_lookup", "multi_hop", "commonsense"),
    "reasoning": ("counting", "arithmetic", "chart_table", "geometry"),
}
LABELS = ("correct", "incorrect", "neutral")
# step role -> error types that can be injected there; each toy kind lists its roles in order
ROLE_ERRORS = {"plan": (), "crop": ("tool_invocation", "region_selection"),
               "perceive": ("visual_perception",), "relate": ("relationship_understanding",),
               "recall": ("knowledge_hallucination",), "compute": ("logical_calculation",),
               "answer": ("answer_format",)}
KINDS = {"attribute": (("perception", "attribute"), ("plan", "crop", "perceive", "answer")),
         "fact": (("knowledge", "fact_lookup"), ("plan", "crop", "perceive", "recall", "answer")),
         "relation": (("spatial", "relative_position"), ("plan", "crop", "perceive", "relate", "answer")),
         "count": (("reasoning", "counting"), ("plan", "crop", "perceive", "compute", "answer"))}


def _fail(where: str, field: str, msg: str):
    raise UserError(f"{where}: field '{field}' {msg}")


def validate_record(rec, where: str, base_dir: Path | None = None, require_labels: bool = True) -> dict:
    """Check one trajectory record; raise UserError naming `where` (file:line) and the field."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(rec).__name__}.")
    for key in ("id", "question"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            _fail(where, key, "must be a non-empty string.")
    for key in ("images", "answers"):
        v = rec.get(key)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            _fail(where, key, "must be a non-empty list of non-empty strings.")
    cat, sub = rec.get("category"), rec.get("subcategory")
    if cat not in TAXONOMY:
        _fail(where, "category", f"must be one of {', '.join(TAXONOMY)}; got {cat!r}.")
    if sub not in TAXONOMY[cat]:
        _fail(where, "subcategory", f"must be one of {', '.join(TAXONOMY[cat])} for category {cat!r}; "
                                    f"got {sub!r}.")
    if not isinstance(rec.get("final_answer"), (str, type(None))):
        _fail(where, "final_answer", "must be a string or null.")
    steps = rec.get("steps")
    if not isinstance(steps, list) or not steps:
        _fail(where, "steps", "must be a non-empty list of step objects.")
    for i, s in enumerate(steps):
        f = f"steps[{i}]"
        if not isinstance(s, dict):
            _fail(where, f, "must be a JSON object.")
        if not isinstance(s.get("text"), str) or not s["text"].strip():
            _fail(where, f + ".text", "must be a non-empty string.")
        call = s.get("tool_call")
        if call is not None and not (isinstance(call, dict) and isinstance(call.get("name"), str)
                                     and isinstance(call.get("arguments", {}), dict)):
            _fail(where, f + ".tool_call", 'must be null or {"name": str, "arguments": {...}}.')
        for key in ("observation", "tool_image"):
            if not isinstance(s.get(key), (str, type(None))):
                _fail(where, f"{f}.{key}", "must be a string or null.")
        if s.get("tool_image") is not None and call is None:
            _fail(where, f + ".tool_image", "needs a tool_call that produced it.")
        label, etype = s.get("label"), s.get("error_type")
        if label is None and require_labels:
            _fail(where, f + ".label", "is null: this trajectory is unannotated (e.g. generated.jsonl); "
                                       f"label every step with one of {', '.join(LABELS)} first.")
        if label is not None and label not in LABELS:
            _fail(where, f + ".label", f"must be one of {', '.join(LABELS)}; got {label!r}.")
        if label == "incorrect" and etype not in ERROR_TYPES:
            _fail(where, f + ".error_type", f"must be one of {', '.join(ERROR_TYPES)} for an incorrect "
                                            f"step; got {etype!r}.")
        if label != "incorrect" and etype is not None:
            _fail(where, f + ".error_type", f"must be null unless label is 'incorrect' (label is {label!r}).")
    inj = rec.get("injected")
    if inj is not None:
        ok = isinstance(inj, dict) and isinstance(inj.get("step"), int) and 0 <= inj["step"] < len(steps)
        if not ok or steps[inj["step"]].get("error_type") != inj.get("error_type"):
            _fail(where, "injected", "must be null or {step, error_type} matching that step's label.")
    if base_dir is not None:
        paths = [("images", p) for p in rec["images"]] + [(f"steps[{i}].tool_image", s["tool_image"])
                                                          for i, s in enumerate(steps) if s.get("tool_image")]
        for field, p in paths:
            if not (base_dir / p).is_file():
                _fail(where, field, f"points to {base_dir / p}, which does not exist.")
    return rec


def load_records(path: str, require_labels: bool = True) -> list[dict]:
    """Read (common.data.read_records) and validate a trajectory file; a bad row is a UserError naming file:line."""
    if not Path(path).is_file():
        raise UserError(f"trajectory file {path} does not exist (run --stage data, or pass --data).")
    records, seen = [], set()
    for where, rec in read_records(path, "trajectory file"):
        validate_record(rec, where, Path(path).parent, require_labels)
        if rec["id"] in seen:
            _fail(where, "id", f"{rec['id']!r} is used by an earlier record.")
        seen.add(rec["id"])
        records.append(dict(rec, _base=str(Path(path).parent)))
    return records


def save_records(records: list[dict], path: Path) -> None:
    """Write records as JSONL; in-memory PIL images (`_pil`) go to <dir>/images/ as PNGs."""
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            pil = rec.get("_pil", {})
            for rel, im in zip(rec["images"], pil.get("images", [])):
                if not (path.parent / rel).exists():
                    im.save(path.parent / rel)
            for k, im in pil.get("steps", {}).items():
                im.save(path.parent / rec["steps"][k]["tool_image"])
            rec["_base"] = str(path.parent)
            row = {k: v for k, v in rec.items() if not k.startswith("_")}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def record_images(rec: dict) -> tuple[list[Image.Image], dict[int, Image.Image]]:
    """(question images, {step index: tool image}), from memory or from disk."""
    if rec.get("_pil") is not None:
        return rec["_pil"]["images"], rec["_pil"].get("steps", {})
    base = rec["_base"]
    return ([open_image(p, base, rec["id"]) for p in rec["images"]],
            {i: open_image(s["tool_image"], base, rec["id"]) for i, s in enumerate(rec["steps"]) if s.get("tool_image")})


def toy_questions(world: World, rng: random.Random) -> list[dict]:
    """Four questions per scene on gog.py's world: its glance (attribute) and gaze (fact) questions,
    plus our relation and counting questions computed from the tile boxes."""
    specs = []
    for scene in world.scenes:
        tiles = scene["tiles"]
        for q in world.questions:
            if q["scene_id"] == scene["id"] and q["level"] in ("glance", "gaze"):
                target = next(t for t in tiles if t["name"] == q["target"])
                specs.append(dict(kind="attribute" if q["level"] == "glance" else "fact", id=q["id"],
                                  scene=scene, question=q["question"], answers=q["answers"], target=target,
                                  attr="color" if q["answers"][0] == target["color"] else "shape",
                                  fact="year" if q["answers"][0].isdigit() else "city"))
        for a in rng.sample(tiles, len(tiles)):  # relation: the only tile in one direction from an anchor
            by_dir = {}
            for b in tiles:
                if b is not a:
                    by_dir.setdefault(direction(a["box"], b["box"]), []).append(b)
            options = [(d, bs[0]) for d, bs in by_dir.items() if len(bs) == 1 and
                       any(t["color"] != bs[0]["color"] for t in tiles if t is not a and t is not bs[0])]
            if options:
                rel, b = rng.choice(options)
                d = rng.choice([t for t in tiles if t is not a and t is not b and t["color"] != b["color"]])
                specs.append(dict(kind="relation", id=f"{scene['id']}-relation", scene=scene, rel=rel,
                                  question=f"What colour is the emblem on the tile {rel} the tile labelled "
                                           f"{tag(a)}?", answers=[b["color"]], anchor=a, target=b, decoy=d))
                break
        shape = rng.choice([t["shape"] for t in tiles])
        specs.append(dict(kind="count", id=f"{scene['id']}-count", scene=scene, shape=shape,
                          question=f"How many tiles in the image show a {shape} emblem?",
                          answers=[str(sum(t["shape"] == shape for t in tiles))]))
    return specs


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


def crop_step(image: Image.Image, box: list, text: str, tool_error: str | None):
    """A crop step through the shared tool (common.tools). tool_error picks a broken call."""
    w, h = seen_size(image)
    seen = to_seen(box, image)
    bad = {"reversed": seen[2:] + seen[:2], "three_numbers": seen[:3],
           "outside": [w + 10, h + 10, w + 60, h + 60]}
    call = {"name": "zoom" if tool_error == "unknown_tool" else "crop",
            "arguments": {"bbox_2d": bad.get(tool_error, seen)}}
    action = parse_action(f"<tool_call>{json.dumps(call)}</tool_call>")
    out, obs = (None, action.error) if action.kind == "error" else crop(image, action.args["bbox_2d"], (w, h))
    return {"text": text, "tool_call": call, "observation": obs}, out


def fact_pool(world: World, fact: str) -> list[str]:
    """Every answer in the world of the same kind (years are digits, cities are not)."""
    return [a for q in world.questions for a in q["answers"] if a.isdigit() == (fact == "year")
            and a not in {t[k] for s in world.scenes for t in s["tiles"] for k in ("color", "shape")}]


def other(pool: list, gold: str, rng: random.Random) -> str:
    """A value from `pool` that differs from `gold` (normalised)."""
    choices = sorted({p for p in pool if normalize_answer(p) != normalize_answer(gold)})
    if not choices:
        raise ValueError(f"cannot make a wrong value for {gold!r}: the pool {pool} has no other value.")
    return rng.choice(choices)


def toy_trajectory(spec: dict, world: World, inject: str | None, rng: random.Random, rid: str) -> dict:
    """One thinking-with-images trajectory for a toy question, with `inject` (an error type or
    None) placed on the first step whose role allows it. Labels: steps before it "correct", it
    "incorrect", the rest "neutral" (3); those later steps reason on from the wrong premise, so
    an injected error changes the final answer."""
    kind, ((category, subcategory), roles) = spec["kind"], KINDS[spec["kind"]]
    k_err = next((i for i, r in enumerate(roles) if inject in ROLE_ERRORS[r]), None) if inject else None
    if inject is not None and k_err is None:
        raise ValueError(f"a {kind} trajectory has no step where {inject} can happen.")
    image, tiles, tgt = spec["scene"]["image"], spec["scene"]["tiles"], spec.get("target")
    colors = sorted({t["color"] for s in world.scenes for t in s["tiles"]})
    shapes = sorted({t["shape"] for s in world.scenes for t in s["tiles"]})
    err = lambda i: k_err == i  # noqa: E731
    desc = lambda t, c=None, s=None: (  # noqa: E731
        f"a tile labelled {tag(t)} ({c or t['color']} {s or t['shape']})")
    say = lambda text: steps.append({"text": text})  # noqa: E731
    steps, crops = [], {}
    # step 0 (plan): the tiles the crop must hold ----------------------------------------------
    if kind == "count":
        say(f"I will zoom in on the region that holds all the tiles and count the {spec['shape']} emblems.")
        need = [t["box"] for t in tiles]
    elif kind == "relation":
        say(f"I need the tile labelled {tag(spec['anchor'])} and the tile {spec['rel']} it. "
            f"I will zoom in on the area around it.")
        need = [spec["anchor"]["box"], tgt["box"], spec["decoy"]["box"]]
    else:
        what = "then a fact about its organisation" if kind == "fact" else "then read its emblem"
        say(f"The question is about the small tile labelled {tag(tgt)}; I will zoom in on it, {what}.")
        need = [tgt["box"]]
    seen_tiles = [t for t in tiles if t["box"] in need] if kind != "count" else tiles
    box = union_box(need, image.size)
    # step 1 (crop) ----------------------------------------------------------------------------
    if err(1) and inject == "region_selection":  # a valid crop of a tile that holds no evidence
        if kind == "count":  # one tile without the asked shape: the count in view is wrong
            wrong = ([t for t in tiles if t["shape"] != spec["shape"]] or tiles)[0]
        else:  # a tile that is not needed, preferably one whose asked attribute differs
            attr = spec.get("attr", "color")
            unneeded = [t for t in tiles if t["box"] not in need[:2]]
            wrong = sorted(unneeded, key=lambda t: t[attr] == tgt[attr])[0]
        box, seen_tiles = union_box([wrong["box"]], image.size), [wrong]
    tool_error = rng.choice(["reversed", "unknown_tool", "three_numbers", "outside"]) \
        if err(1) and inject == "tool_invocation" else None
    step, out = crop_step(image, box, "Zoom in on that region.", tool_error)
    steps.append(step)
    if out is not None:
        crops[1] = out
    failed = out is None
    # steps 2.. by kind -------------------------------------------------------------------------
    if kind in ("attribute", "fact"):
        seen = seen_tiles[0]
        c, s, name = seen["color"], seen["shape"], None if seen["is_distractor"] else seen["name"]
        if failed:
            c, s = other(colors, tgt["color"], rng), other(shapes, tgt["shape"], rng)
            say(f"The zoom failed; from the overview the emblem looks like a {c} {s}.")
        else:
            if err(2) and kind == "attribute":  # visual_perception: misread the asked attribute
                c = other(colors, c, rng) if spec["attr"] == "color" else c
                s = other(shapes, s, rng) if spec["attr"] == "shape" else s
            elif err(2):  # visual_perception: take the emblem for another entity's emblem
                e = rng.choice([t for sc in world.scenes for t in sc["tiles"]
                                if not t["is_distractor"] and t["name"] != seen["name"]])
                c, s, name = e["color"], e["shape"], e["name"]
            who = f", the emblem of {name}" if kind == "fact" and name else ""
            say(f"The zoomed view shows the tile labelled {tag(seen)} with a {c} {s} emblem{who}.")
        if kind == "attribute":
            value = {"color": c, "shape": s}[spec["attr"]]
        else:
            ok = not failed and not err(2) and seen is tgt
            name = name if name and not failed else "the organisation with that emblem"
            pool = fact_pool(world, spec["fact"])
            value = spec["answers"][0] if ok and not err(3) else other(pool, spec["answers"][0], rng)
            verb = "was founded in" if spec["fact"] == "year" else "is based in"
            say(f"I recall that {name} {verb} {value}.")
    elif kind == "relation":
        a, b, d = spec["anchor"], tgt, spec["decoy"]
        if failed:
            value = other(colors, b["color"], rng)
            say(f"The zoom failed; in the overview I make out a {value} emblem near the tile "
                f"labelled {tag(a)}.")
            say(f"I take that tile to be the one {spec['rel']} the tile labelled {tag(a)}.")
        elif len(seen_tiles) == 1:  # after a region error: only an unrelated tile is in view
            value = seen_tiles[0]["color"]
            say(f"The zoomed view shows {desc(seen_tiles[0])}.")
            say(f"I take the tile labelled {tag(seen_tiles[0])} to be the one {spec['rel']} the tile "
                f"labelled {tag(a)}.")
        else:
            cb = other(colors, b["color"], rng) if err(2) else b["color"]  # visual_perception: misread b
            parts = [desc(b, cb), desc(d)]
            rng.shuffle(parts)
            say(f"The zoomed view shows {desc(a)}, {parts[0]} and {parts[1]}.")
            pick, value = (d, d["color"]) if err(3) else (b, cb)  # relationship_understanding: the decoy
            say(f"The tile labelled {tag(pick)} is {spec['rel']} the tile labelled {tag(a)}.")
    else:  # count
        if failed:
            value = str(int(spec["answers"][0]) + rng.choice([1, 2]))
            say("The zoom failed; the emblems in the overview are too small to read.")
            say(f"I estimate {value} {spec['shape']} emblems.")
        else:
            listed = [(t, t["shape"]) for t in seen_tiles]
            if err(2):  # visual_perception: one tile's shape misread, which changes the count
                j = rng.randrange(len(listed))
                t = listed[j][0]
                misread = other(shapes, spec["shape"], rng) if t["shape"] == spec["shape"] else spec["shape"]
                listed[j] = (t, misread)
            say("The zoomed view shows " + ", ".join(desc(t, None, s) for t, s in listed) + ".")
            hits = [tag(t) for t, s in listed if s == spec["shape"]]
            n = len(hits)
            if err(3):  # logical_calculation: off by one
                n += 1 if not hits or rng.random() < 0.5 else -1
            say(f"The tiles with a {spec['shape']} emblem: {', '.join(hits) or 'none'}; that makes {n}.")
            value = str(n)
    # last step: the answer ---------------------------------------------------------------------
    if err(len(roles) - 1) and rng.random() < 0.5:  # answer_format: no <answer> tags
        say(f"The answer is {value}.")
    elif err(len(roles) - 1):                       # answer_format: the answer contradicts the reasoning
        pool = {"attribute": shapes if spec.get("attr") == "shape" else colors, "relation": colors,
                "count": [str(i) for i in range(len(tiles) + 2)],
                "fact": fact_pool(world, spec.get("fact", "year"))}
        say(f"So the answer is {value}. <answer>{other(pool[kind], value, rng)}</answer>")
    else:
        say(f"So the answer is {value}. <answer>{value}</answer>")
    assert len(steps) == len(roles), (kind, len(steps))
    for i, s in enumerate(steps):
        s.setdefault("tool_call", None)
        s.setdefault("observation", None)
        s["tool_image"] = f"images/{rid}-s{i}.png" if i in crops else None
        s["label"] = "correct" if k_err is None or i < k_err else "incorrect" if i == k_err else "neutral"
        s["error_type"] = inject if i == k_err else None
    final = parse_action(steps[-1]["text"])
    return {"id": rid, "question": spec["question"], "images": [f"images/{spec['scene']['id']}.png"],
            "answers": spec["answers"], "final_answer": final.answer if final.kind == "answer" else None,
            "category": category, "subcategory": subcategory, "source": "toy",
            "injected": None if k_err is None else {"step": k_err, "error_type": inject}, "steps": steps,
            "_pil": {"images": [image], "steps": crops}}


def build_toy_set(world: World, seed: int, p_clean: float) -> list[dict]:
    """One trajectory per toy question; a non-clean one gets the eligible error type used least
    so far (ties: the type fewest kinds allow, then at random), so all 7 types appear early."""
    rng = random.Random(seed)
    used = Counter({t: 0 for t in ERROR_TYPES})
    kinds_of = Counter(t for _, roles in KINDS.values() for r in roles for t in ROLE_ERRORS[r])
    records = []
    for spec in toy_questions(world, rng):
        inject = None
        if rng.random() >= p_clean:
            eligible = [t for r in KINDS[spec["kind"]][1] for t in ROLE_ERRORS[r]]
            best = min((used[t], kinds_of[t]) for t in eligible)
            inject = rng.choice([t for t in eligible if (used[t], kinds_of[t]) == best])
            used[inject] += 1
        records.append(toy_trajectory(spec, world, inject, rng, spec["id"]))
    return records


# =============================================================================================
# Trajectory generation from a policy with the shared crop tool
# =============================================================================================
POLICY_SYSTEM = """You answer questions about an image step by step, one short step per turn.
To look closer, zoom in: <tool_call>{"name": "crop", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}</tool_call>
in pixels of the image as you see it; the zoomed image comes back in the next turn.
End with <answer>short answer</answer>."""


def policy_messages(ex: dict) -> list[dict]:
    w, h = seen_size(ex["image"])
    return [{"role": "system", "content": POLICY_SYSTEM},
            {"role": "user", "content": [{"type": "image", "image": ex["image"]}, {
                "type": "text", "text": f"(image: {w}x{h} pixels) {ex['question']}"}]}]


def crop_tool(args: dict, r) -> tuple[str, Image.Image | None]:
    out, msg = crop(r.images[0], args.get("bbox_2d"), seen_size(r.images[0]))
    return msg, out


def policy_trajectories(policy, specs: list[dict], args: Args, G: int, generate=None) -> list[dict]:
    """G sampled trajectories per question -> unannotated records (label null): each assistant turn
    is a step; its tool call, observation and crop attach to it. `generate`: tests' scripted sampler."""
    if not policy.is_vlm:
        raise ValueError(f"{policy.name} is text-only and cannot see the image; "
                         "use a VLM (tiny, Qwen2.5-VL).")
    examples = [dict(id=s["id"], image=s["scene"]["image"], question=s["question"], spec=s) for s in specs]
    rollouts = run_rollouts(policy, examples, num_generations=G, make_messages=policy_messages,
                            tools={"crop": crop_tool}, max_turns=args.max_turns, max_tool_calls={"crop": 2},
                            max_new_tokens=args.max_completion_length, max_total_tokens=args.max_turns * 400,
                            reprompt="Continue with the next step, or give the final <answer>.",
                            temperature=args.temperature, generate=generate)
    records = []
    for j, r in enumerate(rollouts):
        spec, rid = r.example["spec"], f"{r.example['id']}-g{j % G}"
        steps, crops = [], {}
        for turn in r.trajectory:
            if turn["role"] == "assistant":
                steps.append({"text": turn["text"].strip() or "(empty step)", "tool_call": None,
                              "observation": None, "tool_image": None, "label": None, "error_type": None})
            elif steps and turn["name"] != "reprompt":
                steps[-1].update(tool_call={"name": turn["name"], "arguments": turn["args"]},
                                 observation=turn["observation"])
                if turn.get("image") is not None:
                    crops[len(steps) - 1] = turn["image"]
                    steps[-1]["tool_image"] = f"images/{rid}-s{len(steps) - 1}.png"
        (category, subcategory), _ = KINDS[spec["kind"]]
        records.append({"id": rid, "question": spec["question"],
                        "images": [f"images/{spec['scene']['id']}.png"],
                        "answers": spec["answers"], "final_answer": r.answer, "category": category,
                        "subcategory": subcategory, "source": f"policy:{policy.name}", "injected": None,
                        "steps": steps, "_pil": {"images": [spec["scene"]["image"]], "steps": crops}})
    return records


# =============================================================================================
# Prompt format and parsing: the LVLM as PRM
# =============================================================================================
PRM_SYSTEM = ("You are a process reward model. You check one step of a visual reasoning trajectory in "
              "which the solver may zoom into the image with a crop tool.")
PRM_REPLY = {"judge": "Reply with one word: Correct or Incorrect.",
             "prob": "Reply with + if it is correct and - if it is incorrect."}


def render_step(i: int, s: dict, shown: bool) -> str:
    line = f"Step {i + 1}: {s['text']}"
    if s.get("tool_call") is not None:
        line += f"\n  [tool call {json.dumps(s['tool_call'])} -> {s.get('observation') or 'no output'}]"
        line += " (its image is the last one shown)" if shown else ""
    return line


def prm_messages(rec: dict, k: int, images: list, step_images: dict, mode: str, vlm: bool) -> list[dict]:
    """Question + images + steps 1..k; asks whether step k is correct (5)."""
    shown = vlm and k in step_images
    steps = "\n".join(render_step(i, s, shown and i == k) for i, s in enumerate(rec["steps"][: k + 1]))
    text = (f"Question: {rec['question']}\n{steps}\n\nIs Step {k + 1} correct, given the question, the "
            f"image{'s' if len(images) > 1 else ''} and the steps before it? Judge Step {k + 1} only. "
            f"{PRM_REPLY[mode]}")
    pics = list(images) + ([step_images[k]] if shown else [])
    user = ([{"type": "image", "image": im} for im in pics] + [{"type": "text", "text": text}] if vlm
            else "(Images not shown: text-only PRM.)\n" + text)
    return [{"role": "system", "content": PRM_SYSTEM}, {"role": "user", "content": user}]


def parse_step_verdict(text: str | None) -> float | None:
    """A PRM reply -> score in [0, 1] or None. Step numbers are dropped first ("Step 1 is
    correct" is not the score 1); a leading "+" / "-" is 1 / 0; the rest is
    common.judge.parse_verdict (earliest Correct/Incorrect/yes/no/fraction wins)."""
    if not isinstance(text, str):
        return None
    t = re.sub(r"(?i)\bstep\s*#?\d+\b", " ", text).strip().lstrip("*_`'\" ")
    if t[:1] in ("+", "-") and not t[1:2].isdigit():
        return 1.0 if t[0] == "+" else 0.0
    return parse_verdict(t)


@torch.no_grad()
def plus_probability(policy, batch: list[list[dict]]) -> list[float]:
    """P("+") / (P("+") + P("-")) of the next token after each prompt (6)."""
    tok = policy.tokenizer
    plus, minus = (tok.encode(s, add_special_tokens=False)[0] for s in ("+", "-"))
    seqs = [encode(tok, policy.image_processor, m, add_generation_prompt=True) for m in batch]
    inputs = collate(seqs, tok.pad_token_id, "left", image_token_id(tok) if policy.is_vlm else None)
    inputs.pop("loss_mask")
    inputs = {k: v.to(policy.device) for k, v in inputs.items()}
    logits = policy.model(**inputs, logits_to_keep=1).logits          # (B, 1, V)
    two = logits[:, -1, [plus, minus]].float()                         # (B, 2)
    return torch.softmax(two, dim=-1)[:, 0].tolist()                   # (B,)


def score_steps(policy, records: list[dict], args: Args, log: RunLog | None = None) -> list[list[dict]]:
    """Every step of every record -> {"score": float | None, "reply": str}, per record."""
    items = [(r, k) for r in records for k in range(len(r["steps"]))]
    out, starts = {}, range(0, len(items), args.batch_size)
    for b in (log.bar(starts, desc=f"PRM ({args.prm})") if log else starts):
        chunk = items[b: b + args.batch_size]
        images = {id(r): record_images(r) for r, _ in chunk}  # opened per batch: real sets are large
        msgs = [prm_messages(r, k, *images[id(r)], args.prm, policy.is_vlm) for r, k in chunk]
        if args.prm == "prob":
            scores = plus_probability(policy, msgs)
            replies = [f"P(+)={p:.3f}" for p in scores]
        else:
            replies = policy.chat(msgs, max_new_tokens=args.judge_max_new_tokens, temperature=0.0)
            scores = [parse_step_verdict(x) for x in replies]
        for (r, k), sc, rep in zip(chunk, scores, replies):
            out[(id(r), k)] = {"score": sc, "reply": rep}
        if log:
            log.log({"unparsed": sum(s is None for s in scores) / len(scores),
                     "mean_score": sum(s or 0.0 for s in scores) / len(scores)}, step=b // args.batch_size)
    return [[out[(id(r), k)] for k in range(len(r["steps"]))] for r in records]


# =============================================================================================
# Metrics: ProcessBench, PRMBench, VisualProcessBench and the paper's analyses
# Undefined values (an empty class: 0/0) are None (JSON null), never 0 or 1.
# =============================================================================================
def ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def f1_score(tp: int, fp: int, fn: int) -> float | None:
    """F1 = 2TP / (2TP + FP + FN) (= harmonic mean of precision and recall); None when the
    class occurs neither in the gold labels nor in the predictions."""
    return ratio(2 * tp, 2 * tp + fp + fn)


def macro(*values: float | None) -> float | None:
    """Mean over the defined values (sklearn's macro average over labels present in gold or
    predictions); None when none is defined."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def first_error(labels: list[str]) -> int:
    """ProcessBench's label: index of the first incorrect step, -1 when there is none."""
    return next((i for i, lab in enumerate(labels) if lab == "incorrect"), -1)


def first_flagged(pred_correct: list[bool]) -> int:
    """ProcessBench's prediction: index of the first step judged wrong, -1 when none is."""
    return next((i for i, p in enumerate(pred_correct) if not p), -1)


def processbench(gold_first: list[int], pred_first: list[int]) -> dict:
    """acc_err over trajectories with an error, acc_corr over error-free ones,
    F1 = 2 acc_err acc_corr / (acc_err + acc_corr) (None if either is undefined; 0 if both are 0)."""
    err = [p == g for g, p in zip(gold_first, pred_first) if g != -1]
    corr = [p == -1 for g, p in zip(gold_first, pred_first) if g == -1]
    acc_err, acc_corr = ratio(sum(err), len(err)), ratio(sum(corr), len(corr))
    f1 = None if acc_err is None or acc_corr is None else \
        0.0 if acc_err + acc_corr == 0 else 2 * acc_err * acc_corr / (acc_err + acc_corr)
    return {"acc_err": acc_err, "acc_corr": acc_corr, "f1": f1, "n_err": len(err), "n_corr": len(corr)}


def confusion(labels: list[str], pred_correct: list[bool]) -> dict:
    """Step confusion matrix, correct steps as the positive class; neutral steps excluded (3)."""
    pairs = [(lab == "correct", p) for lab, p in zip(labels, pred_correct) if lab != "neutral"]
    return {"tp": sum(g and p for g, p in pairs), "fp": sum(not g and p for g, p in pairs),
            "fn": sum(g and not p for g, p in pairs), "tn": sum(not g and not p for g, p in pairs)}


def prmbench(labels: list[str], pred_correct: list[bool]) -> dict:
    """PRMBench: F1 (positive = correct steps), negative F1 (positive = incorrect steps),
    PRMScore = 0.5 F1 + 0.5 F1_neg (the defined one alone when a class is absent)."""
    c = confusion(labels, pred_correct)
    f1, f1_neg = f1_score(c["tp"], c["fp"], c["fn"]), f1_score(c["tn"], c["fn"], c["fp"])
    return {"f1": f1, "f1_neg": f1_neg, "PRMScore": macro(f1, f1_neg)}


def visualprocessbench(labels: list[str], pred_correct: list[bool]) -> dict:
    """VisualProcessBench: every erroneous step must be found; macro-F1 = mean of the F1 on
    correct steps and the F1 on incorrect steps, neutral steps excluded: PRMBench's F1s (3)."""
    p = prmbench(labels, pred_correct)
    return {"macro_f1": p["PRMScore"], "f1_correct": p["f1"], "f1_incorrect": p["f1_neg"],
            "n_steps": sum(confusion(labels, pred_correct).values())}


def step_stats(labels: list[str], pred_correct: list[bool]) -> dict:
    c = confusion(labels, pred_correct)
    n = sum(c.values())
    return {"n_steps": n, "accuracy": ratio(c["tp"] + c["tn"], n),
            "macro_f1": visualprocessbench(labels, pred_correct)["macro_f1"],
            "detection_rate": ratio(c["tn"], c["tn"] + c["fp"])}  # incorrect steps judged incorrect


def positive_bias(labels: list[str], pred_correct: list[bool]) -> dict:
    """P(judged correct | step wrong) vs P(judged correct | step right): a PRM with a positive
    bias calls many wrong steps correct (the first is high)."""
    c = confusion(labels, pred_correct)
    return {"p_judged_correct_given_wrong": ratio(c["fp"], c["fp"] + c["tn"]),
            "p_judged_correct_given_right": ratio(c["tp"], c["tp"] + c["fn"]),
            "judged_correct_rate": ratio(c["tp"] + c["fp"], sum(c.values()))}


def position_bucket(i: int, n: int, n_buckets: int) -> int:
    """Relative position i / (n - 1) in [0, 1] (0 for a one-step trajectory) -> bucket index."""
    rel = i / (n - 1) if n > 1 else 0.0
    return min(int(rel * n_buckets), n_buckets - 1)


def evaluate(records: list[dict], pred_correct: list[list[bool]], n_buckets: int = 4) -> dict:
    """All metrics of the paper for step judgements `pred_correct` (per record, per step)."""
    labels = [[s["label"] for s in r["steps"]] for r in records]
    flat_l = [lab for ls in labels for lab in ls]
    flat_p = [p for ps in pred_correct for p in ps]
    gold_first, pred_first = [first_error(ls) for ls in labels], [first_flagged(ps) for ps in pred_correct]
    res = {"ProcessBench": processbench(gold_first, pred_first), "PRMBench": prmbench(flat_l, flat_p),
           "VisualProcessBench": visualprocessbench(flat_l, flat_p),
           "step_accuracy": step_stats(flat_l, flat_p)["accuracy"],
           "positive_bias": positive_bias(flat_l, flat_p)}
    # per error type: the trajectories holding that type (PRMBench's per-category subsets); the
    # detection rate counts only the incorrect steps of that type
    res["per_error_type"] = {}
    for t in ERROR_TYPES:
        idx = [j for j, r in enumerate(records) if any(s.get("error_type") == t for s in r["steps"])]
        if not idx:
            continue
        stats = step_stats([x for j in idx for x in labels[j]], [x for j in idx for x in pred_correct[j]])
        hits = [p for j in idx for s, p in zip(records[j]["steps"], pred_correct[j])
                if s.get("error_type") == t]
        stats.update(detection_rate=ratio(sum(not p for p in hits), len(hits)), n_trajectories=len(idx))
        res["per_error_type"][t] = stats
    # pooled steps per category, per subcategory and per relative-position bucket
    names = [f"{b / n_buckets:.2f}-{(b + 1) / n_buckets:.2f}" for b in range(n_buckets)]
    pools = {"per_category": {}, "per_subcategory": {}, "by_position": {b: [] for b in names}}
    for r, ls, ps in zip(records, labels, pred_correct):
        for i, step in enumerate(zip(ls, ps)):
            pools["per_category"].setdefault(r["category"], []).append(step)
            pools["per_subcategory"].setdefault(f"{r['category']}/{r['subcategory']}", []).append(step)
            pools["by_position"][names[position_bucket(i, len(ls), n_buckets)]].append(step)
    for key, pool in pools.items():
        res[key] = {g: step_stats([lab for lab, _ in st], [p for _, p in st])
                    for g, st in sorted(pool.items())}
    res["n_trajectories"], res["n_steps"] = len(records), len(flat_l)
    return res


# =============================================================================================
# Search: PRM-guided best-of-N
# =============================================================================================
def best_of_n(questions: list[list[dict]], ns: list[int], repeats: int, seed: int) -> dict:
    """questions: per question, its candidates {"correct": bool, "answer": str | None,
    "scores": [step score]}. For each N, `repeats` random N-subsets per question; selection by
    PRM min / mean aggregation (ties broken at random), majority vote over the normalised answers
    (no answer = no vote; ties at random), random choice (its expected accuracy, exactly),
    and pass@N (some candidate is right: the ceiling). With "gold_scores" on every candidate
    (toy labels), "oracle_prm_min" selects by them too. Returns {method: {N: accuracy}}."""
    rng = random.Random(seed)
    oracle = all("gold_scores" in c for q in questions for c in q)
    methods = ("prm_min", "prm_mean") + ("oracle_prm_min",) * oracle + ("majority_vote", "random", "pass@N")
    selectors = (("prm_min", "scores", min), ("prm_mean", "scores", lambda s: sum(s) / len(s)),
                 ("oracle_prm_min", "gold_scores", min))[: 2 + oracle]
    acc = {m: {} for m in methods}
    for n in ns:
        tot = dict.fromkeys(methods, 0.0)
        for cands in questions:
            if n > len(cands):
                raise UserError(f"best-of-{n} needs {n} candidates per question; got {len(cands)}.")
            for _ in range(repeats):
                sub = rng.sample(cands, n)
                for m, key, agg in selectors:
                    vals = [agg([x or 0.0 for x in c[key]]) for c in sub]  # unparsed -> 0 (4)
                    tot[m] += rng.choice([c for c, v in zip(sub, vals) if v == max(vals)])["correct"]
                votes = Counter(normalize_answer(c["answer"]) for c in sub if c["answer"] is not None)
                votes.pop("", None)
                if votes:
                    top = rng.choice(sorted(a for a, v in votes.items() if v == max(votes.values())))
                    voted = next(c for c in sub if normalize_answer(c["answer"]) == top)
                    tot["majority_vote"] += voted["correct"]
                tot["random"] += sum(c["correct"] for c in sub) / n
                tot["pass@N"] += any(c["correct"] for c in sub)
        for m in methods:
            acc[m][n] = tot[m] / (repeats * len(questions))
    return acc


# =============================================================================================
# Stages
# =============================================================================================
_POLICIES: dict = {}


def get_policy(args: Args, prm: bool):
    """The model (with --prm_adapter when it acts as the PRM), loaded once per process."""
    key = (args.model, args.prm_adapter if prm else None)
    if key not in _POLICIES:
        if key[1]:
            print(f"[prm_bench] PRM = {args.model} + adapter {key[1]}")
        pol = load_policy(args.model, load_in_4bit=args.load_in_4bit, lora=False, adapter=key[1],
                          seed=args.seed)
        if not pol.is_vlm and prm:
            print(f"[prm_bench] {pol.name} is text-only: the PRM judges steps without seeing the images.")
        _POLICIES[key] = pol
    return _POLICIES[key]


def toy_world(args: Args) -> World:
    return build_world(args.seed, args.n_scenes, args.image_size)


def html_items(records: list[dict], judged: list[list[dict]] | None = None) -> list[dict]:
    items = []
    for j, rec in enumerate(records):
        images, step_images = record_images(rec)
        turns = []
        for i, s in enumerate(rec["steps"]):
            gold = f"{s['label']}{'/' + s['error_type'] if s.get('error_type') else ''}"
            prm = f" | PRM {judged[j][i]['score']} ({judged[j][i]['reply']!r})" if judged else ""
            turns.append({"role": "assistant", "text": f"[{i}] {s['text']}\n   gold: {gold}{prm}"})
            if s.get("tool_call"):
                turns.append({"role": "tool", "name": s["tool_call"]["name"],
                              "args": s["tool_call"].get("arguments", {}),
                              "observation": s.get("observation") or "", "image": step_images.get(i)})
        items.append({"title": f"{rec['id']} [{rec['category']}/{rec['subcategory']}] {rec['question']}",
                      "images": images, "trajectory": turns,
                      "rewards": {"gold": ", ".join(rec["answers"]), "final": str(rec["final_answer"])}})
    return items


def write_set(records: list[dict], out: Path, name: str, title: str, n_html: int, **load_kw) -> None:
    """<out>/<name>.jsonl (+ PNGs), checked by its own validator, and <out>/<name>.html."""
    save_records(records, out / f"{name}.jsonl")
    load_records(str(out / f"{name}.jsonl"), **load_kw)
    trajectory_html(html_items(records[:n_html]), str(out / f"{name}.html"), title)


def stage_data(args: Args) -> None:
    out = Path(args.out) / "data"
    log = RunLog(str(out))
    world = toy_world(args)
    records = build_toy_set(world, args.seed, args.p_clean)
    write_set(records, out, "toy", "toy trajectories (gold labels)", args.n_html)
    types = Counter(r["injected"]["error_type"] for r in records if r["injected"])
    summary = {"toy_trajectories": len(records), "toy_steps": sum(len(r["steps"]) for r in records),
               "clean": sum(r["injected"] is None for r in records), "error_types": dict(types),
               "categories": dict(Counter(f"{r['category']}/{r['subcategory']}" for r in records))}
    if args.n_policy_questions > 0:  # the generator: the policy with the shared crop tool
        policy = get_policy(args, prm=False)
        if policy.is_vlm:
            specs = toy_questions(world, random.Random(args.seed))[: args.n_policy_questions]
            gen = policy_trajectories(policy, specs, args, args.num_generations)
            write_set(gen, out, "generated", "policy trajectories", args.n_html, require_labels=False)
            summary.update(generated=len(gen), generated_steps=sum(len(r["steps"]) for r in gen),
                           generated_crops=sum(s["tool_image"] is not None for r in gen for s in r["steps"]))
        else:
            print(f"[data] {policy.name} is text-only: no policy trajectories (they need the image).")
    log.log({k: v for k, v in summary.items() if isinstance(v, int)}, step=0)
    log.summary(summary)
    print(f"[data] {summary} -> {out}")


def stage_eval(args: Args) -> dict:
    out = Path(args.out) / "eval"
    log = RunLog(str(out))
    path = args.data or str(Path(args.out) / "data" / "toy.jsonl")
    records = load_records(path)
    if args.max_steps > 0:
        records = records[: args.max_steps]
    policy = get_policy(args, prm=True)
    judged = score_steps(policy, records, args, log)
    pred = [[j["score"] is not None and j["score"] >= args.threshold for j in js] for js in judged]  # (4)
    res = evaluate(records, pred, args.n_buckets)
    res.update(unparsed_rate=ratio(sum(j["score"] is None for js in judged for j in js), res["n_steps"]),
               prm=args.prm, model=policy.name, adapter=args.prm_adapter, data=path, threshold=args.threshold)
    write_json(str(out / "results.json"), res)
    bar_plot({m: {t: v[m] for t, v in res["per_error_type"].items() if v[m] is not None}
              for m in ("detection_rate", "accuracy", "macro_f1")},
             str(out / "per_error_type.png"), f"PRM {policy.name} ({args.prm}) by error type", "rate")
    by_pos = {b: v["accuracy"] for b, v in res["by_position"].items() if v["accuracy"] is not None}
    bar_plot({"accuracy": by_pos},
             str(out / "by_position.png"), "step accuracy by relative position", "accuracy")
    log.samples([{"id": r["id"], "step": i, "label": s["label"], "error_type": s.get("error_type"), **j}
                 for r, js in zip(records, judged) for i, (s, j) in enumerate(zip(r["steps"], js))])
    trajectory_html(html_items(records[: args.n_html], judged), str(out / "judged.html"), "PRM judgements")
    log.summary({k: res[k] for k in ("ProcessBench", "PRMBench", "VisualProcessBench", "positive_bias",
                                     "step_accuracy", "unparsed_rate")})
    print(f"[eval] ProcessBench F1 {res['ProcessBench']['f1']} | PRMScore {res['PRMBench']['PRMScore']} | "
          f"VisualProcessBench macro-F1 {res['VisualProcessBench']['macro_f1']} | unparsed "
          f"{res['unparsed_rate']} -> {out / 'results.json'}")
    return res


def stage_search(args: Args) -> dict:
    out = Path(args.out) / "search"
    log = RunLog(str(out))
    ns = search_ns(args)
    world, rng = toy_world(args), random.Random(args.seed + 1)
    specs = toy_questions(world, rng)[: args.search_questions]
    M = ns[-1]  # candidates per question
    if args.search_source == "toy":  # a simulated policy: the toy generator with random errors (7)
        cands = []
        for spec in specs:
            eligible = [t for r in KINDS[spec["kind"]][1] for t in ROLE_ERRORS[r]]
            for g in range(M):
                inject = None if rng.random() < args.search_p_clean else rng.choice(eligible)
                cands.append(toy_trajectory(spec, world, inject, rng, f"{spec['id']}-c{g}"))
    else:
        cands = policy_trajectories(get_policy(args, prm=False), specs, args, M)
    save_records(cands, out / "candidates.jsonl")
    judged = score_steps(get_policy(args, prm=True), cands, args)
    groups = [[] for _ in specs]  # cands are question-major: M per question
    for j, (rec, js) in enumerate(zip(cands, judged)):
        groups[j // M].append({"correct": bool(exact_match(rec["final_answer"], rec["answers"])),
                               "answer": rec["final_answer"], "scores": [x["score"] for x in js]})
        if args.search_source == "toy":  # gold step labels: the oracle PRM, a sanity ceiling
            groups[j // M][-1]["gold_scores"] = [float(s["label"] != "incorrect") for s in rec["steps"]]
    res = {"accuracy": best_of_n(groups, ns, args.search_repeats, args.seed), "source": args.search_source,
           "questions": len(groups), "candidates_per_question": M, "prm": args.prm,
           "candidate_accuracy": sum(c["correct"] for g in groups for c in g) / max(1, len(cands))}
    for n in ns:
        log.log({m: v[n] for m, v in res["accuracy"].items()}, step=n)
    write_json(str(out / "results.json"), res)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for m, v in res["accuracy"].items():
        ax.plot(ns, [v[n] for n in ns], marker="o", ls="--" if m == "pass@N" else "-", label=m)
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set(xticks=ns, xticklabels=[str(n) for n in ns], xlabel="N", ylabel="accuracy",
           title=f"best-of-N ({args.search_source} candidates, PRM {args.prm})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "best_of_n.png", dpi=110)
    plt.close(fig)
    log.summary(res)
    curves = " | ".join(f"{m} " + " ".join(f"{v[n]:.2f}" for n in ns) for m, v in res["accuracy"].items())
    print(f"[search] {curves}  (N = {ns}) -> {out / 'results.json'}")
    return res


def search_ns(args: Args) -> list[int]:
    try:
        ns = sorted({int(x) for x in args.search_n.split(",") if x.strip()})
    except ValueError:
        ns = []
    if not ns or ns[0] < 1:
        raise UserError(f"--search_n must list positive integers such as 1,2,4,8; got {args.search_n!r}.")
    return ns


def check_inputs(args: Args) -> None:
    """Every user file and list, before any model is loaded."""
    if args.stage in ("search", "all"):
        search_ns(args)
    if args.stage == "eval" or (args.data and args.stage == "all"):
        load_records(args.data or str(Path(args.out) / "data" / "toy.jsonl"))


TINY_SIZES = dict(image_size=224)


def main(argv=None):
    return run_stages(Args, {"data": stage_data, "eval": stage_eval, "search": stage_search}, argv, doc=__doc__,
                      file=__file__, tiny=TINY_SIZES, check=check_inputs)


if __name__ == "__main__":
    main()
