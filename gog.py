"""Glance-or-Gaze (GoG): a search-augmented VLM agent that glances at the whole image, then
answers, searches text, searches the whole image, or gazes (crops a region) and searches on
the crop. "Glance-or-Gaze: ..." arXiv 2601.13942 (ACL 2026 Findings); see shared/papers/gog.md.

Stages (each writes into <out>/<stage>/; `all` runs them in this order):
    python gog.py --stage all --model tiny   # CPU, a few minutes: plumbing only, numbers are noise;
                                             # tiny (or auto without CUDA): TINY_SIZES unless flags say so
    python gog.py --stage data    # toy world (scenes, text KB, image KB, questions) + oracle page
    python gog.py --stage sft     # Reflective GoG Behavior Alignment: oracle (+teacher) trajectories
    python gog.py --stage levels  # SFT pass rate over k samples -> Level 1 (~50 %) / Level 2 (mostly failed)
    python gog.py --stage rl      # GRPO on Level 2, r = (1 - lambda) * acc + lambda * fmt
    python gog.py --stage eval    # accuracy per split/level/benchmark, tool-use statistics, HTML page
    python gog.py --stage ablate  # SFT without gaze; RL on Level 1 vs Level 2
GPU (Qwen2.5-VL-3B in NF4 + LoRA; use Qwen/Qwen2.5-VL-7B-Instruct with 24 GB):
    python gog.py --stage all --model Qwen/Qwen2.5-VL-3B-Instruct --n_scenes 400 \\
        --max_steps 300 --prompts_per_step 4 --max_new_tokens 256 --max_completion_length 2048
Real benchmarks (JSONL: {"image": path relative to the file, "question", "answers": [...]}):
    python gog.py --stage eval --benchmarks fvqa.jsonl,infoseek.jsonl --text_corpus wiki.jsonl

Deviations from the paper (numbered; the code says "(n)" where each one lives):
 1. Data: a procedurally drawn toy world (emblem tiles with labels, distractor tiles, invented
    facts) replaces FVQA/InfoSeek; the 5,750-sample GoG-Instruct set is not public.
 2. Tag format: the paper's prompts are unpublished. We follow the public anchors: DeepEyes'
    `<tool_call>{"name": "crop", "arguments": {"bbox_2d": [...]}}</tool_call>` (pixels of the
    image the model saw), MMSearch-R1's `<text_search>q</text_search>` and
    `<image_search></image_search>` (searches the latest crop, else the whole image), `<reason>`
    for thoughts and `<answer>`; results come back as user turns (crops as images).
 3. lambda = 0.1 (not published; MMSearch-R1's format weight). No tool-use bonus, as in GoG.
 4. Judge: r_acc is sub-exact match (gold inside the answer, answers over --max_answer_words
    words score 0) instead of gpt-oss-120b; `--judge <model>` uses a local LLM judge.
 5. Search backends: local BM25 over the toy text KB and nearest neighbour over a hand-made
    image embedding (common/tools.py) instead of web search; HTTP endpoints via
    TEXT_SEARCH_ENDPOINT / IMAGE_SEARCH_ENDPOINT for real benchmarks.
 6. Trajectories come from the toy world's oracle (plus a --teacher model's correct samples);
    the paper's humans checked crop regions. The 4-sample uncertainty filter uses the teacher,
    or the base model itself when no teacher is given (the paper: a strong model).
 7. Sizes: LoRA also in RL (paper: full actor, lr 2e-6), so lr 1e-5; G = 4 and beta = 0.001 as
    in the paper, but far fewer steps and tokens (paper: 15 epochs, 8,192 response tokens).
 8. Levels: Level 1 = pass rate in (level2_max, level1_max], Level 2 = pass rate <= level2_max;
    a level smaller than --min_level_size is filled with the nearest questions and says so
    (the paper "expands" Level 2 without saying how).
"""
from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.chat import encode
from common.cli import GRPOArgs, UserError, grpo_config, run_stages, start_adapter
from common.data import open_image, read_records, require
from common.grpo import train_grpo
from common.judge import llm_judge_batch, sub_exact_match
from common.models import load_policy
from common.rollout import Rollout, run_rollouts
from common.runlog import RunLog, bar_plot, trajectory_html, write_json
from common.sft import SFTConfig, train_sft
from common.tools import ImageSearch, TextSearch, crop, parse_action, seen_size


@dataclass
class Args(GRPOArgs):
    # --- run ---
    stage: Literal["data", "sft", "levels", "rl", "eval", "ablate", "all"] = "all"
    """which stage to run (`all` = data, sft, levels, rl, eval, ablate)"""
    # --- model ---
    lora_r: int = 8
    """LoRA rank (GoG: r = 8 on all LLM blocks)"""
    # --- GRPO (TRL names) ---
    learning_rate: float = 1e-5
    """GRPO learning rate (GoG: 2e-6 for the full actor; LoRA here) (7)"""
    num_generations: int = 4
    """G, rollouts per question (GoG: 4)"""
    beta: float = 0.001
    """KL coefficient to pi_ref (GoG: 0.001)"""
    max_completion_length: int = 2048
    """tokens per rollout after the prompt, observations included (GoG: 8,192)"""
    # --- toy world (1) ---
    n_scenes: int = 64
    """scenes in the toy world (4 questions each, one per complexity level)"""
    image_size: int = 448
    """scene side in pixels (a multiple of 28, so the model sees it unresized)"""
    test_frac: float = 0.25
    """fraction of scenes held out for eval"""
    benchmarks: str = ""
    """comma-separated benchmark JSONL files to evaluate on as well (FVQA, InfoSeek, ...)"""
    text_corpus: str | None = None
    """JSONL corpus for text search on benchmarks (default: the toy text KB, or TEXT_SEARCH_ENDPOINT)"""
    image_kb: str | None = None
    """JSONL image KB for image search on benchmarks (default: the toy image KB, or IMAGE_SEARCH_ENDPOINT)"""
    # --- agent loop (2) ---
    max_turns: int = 6
    """assistant turns per rollout (a reflective gaze needs 5)"""
    max_new_tokens: int = 256
    """new tokens per assistant turn"""
    max_crops: int = 3
    """crop calls per rollout (gaze + re-gaze after reflection)"""
    max_image_searches: int = 2
    """image-search calls per rollout"""
    max_text_searches: int = 2
    """text-search calls per rollout"""
    search_k: int = 3
    """text-search hits shown to the model"""
    # --- SFT (Reflective GoG Behavior Alignment) ---
    sft_learning_rate: float = 1e-4
    """SFT learning rate (GoG: 1e-4)"""
    sft_epochs: float = 3.0
    """SFT epochs (GoG: 3)"""
    sft_batch_size: int = 8
    """sequences per SFT step (GoG: global batch 8)"""
    sft_max_steps: int = 0
    """cap on SFT steps (0 = epochs decide)"""
    reflect_frac: float = 0.5
    """fraction of gaze questions that also get a reflective trajectory (wrong crop -> re-gaze)"""
    teacher: str | None = None
    """teacher model whose correct agent samples join the oracle's (none = oracle only) (6)"""
    teacher_samples: int = 2
    """teacher samples per question"""
    filter_k: int = 4
    """uncertainty filter: drop questions answered right in all filter_k direct samples"""
    # --- levels ---
    levels_k: int = 4
    """samples per question for the SFT model's pass rate"""
    level2_max: float = 0.25
    """Level 2 = pass rate <= this (mostly failed) (8)"""
    level1_max: float = 0.75
    """Level 1 = pass rate in (level2_max, level1_max] (around half right)"""
    min_level_size: int = 4
    """fill a smaller level with the nearest questions by pass rate, announced (0 = never)"""
    # --- reward and RL ---
    rl_level: Literal[1, 2] = 2
    """train RL on Level 2 (GoG's final recipe) or Level 1"""
    lam: float = 0.1
    """lambda: r = (1 - lambda) * r_acc + lambda * r_fmt (3)"""
    max_answer_words: int = 10
    """answers longer than this get r_acc = 0 (sub-exact match would reward lists) (4)"""
    judge: str | None = None
    """LLM judge model for r_acc and eval (none = sub-exact match) (4)"""
    # --- eval ---
    eval_temperature: float = 0.0
    """sampling temperature in eval (0 = greedy)"""


# =============================================================================================
# Data: the toy visual-search world (1) and loaders for the real benchmarks' files
# =============================================================================================
COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 210), "yellow": (232, 190, 20),
          "purple": (148, 73, 189), "orange": (245, 127, 14)}
SHAPES = ("circle", "square", "triangle", "diamond")
SYLLABLES = "ka lo mi ra ven tor zu pel qui sar no bri dax fen gor hal jun mor vi tek".split()
CITIES = "Velmor Quenby Arlath Dunmere Sorvik Halden Mirask Tobrin Elsk Caravo".split()
EVENTS = "Fair Market Parade Expo Festival Summit Regatta Carnival".split()
ADJECTIVES = "Amber Silver Northern Winter Harbour Lantern Copper Meadow".split()
CONSONANTS = "BCDFGHJKLMNPRSTVZ"
MAKE_WORD = {"name": lambda rng: (rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize(),  # entities
             "label": lambda rng: rng.choice(CONSONANTS) + rng.choice("AEIOU") + rng.choice(CONSONANTS)}


@dataclass
class World:
    scenes: list[dict]      # {"id", "image", "tiles": [{"name", "box", "color", "shape", "is_distractor", "label"}]}
    questions: list[dict]   # {"id", "scene_id", "question", "answers", "level", "target"}
    text_kb: list[dict]     # {"id", "text", "entity"}
    image_kb: list[dict]    # {"image", "name", "caption"}

    @functools.cached_property
    def text_search(self) -> TextSearch:
        return TextSearch(self.text_kb)

    @functools.cached_property
    def image_search(self) -> ImageSearch:
        return ImageSearch(self.image_kb)

    def scene(self, scene_id: str) -> dict:
        return next(s for s in self.scenes if s["id"] == scene_id)


def draw_tile(size: int, color: tuple, shape: str, label: str, filled: bool = True) -> Image.Image:
    """A card: an emblem shape in the top 2/3, a 3-letter label below."""
    tile = Image.new("RGB", (size, size), (246, 244, 236))
    d = ImageDraw.Draw(tile)
    d.rectangle([0, 0, size - 1, size - 1], outline=(40, 40, 40), width=max(1, size // 32))
    m, top = size // 6, size * 0.62
    box = [m, m // 2, size - m, top]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    fill, outline = (color if filled else None), color
    if shape == "circle":
        d.ellipse(box, fill=fill, outline=outline, width=2)
    elif shape == "square":
        d.rectangle(box, fill=fill, outline=outline, width=2)
    elif shape == "triangle":
        d.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill, outline=outline, width=2)
    else:  # diamond
        d.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=fill, outline=outline, width=2)
    font = ImageFont.load_default(size=max(8, size // 4))
    d.text((size / 2, (top + size) / 2), label, fill=(20, 20, 20), font=font, anchor="mm")
    return tile


def invent(rng: random.Random, taken: set, kind: str) -> str:
    """A new MAKE_WORD[kind] word not in `taken` (which it joins)."""
    while (w := MAKE_WORD[kind](rng)) in taken:
        pass
    taken.add(w)
    return w


def build_world(seed: int, n_scenes: int = 8, image_size: int = 448) -> World:
    """The toy world, a pure function of its arguments. Entities have a unique (colour, shape)
    emblem and a 3-letter label; the text KB holds their invented founding year and city; the
    image KB holds each entity tile and each whole scene (the scene-level "photo")."""
    rng = random.Random(seed)
    used: set = set()
    combos = [(c, s) for c in COLORS for s in SHAPES]
    rng.shuffle(combos)
    entities = [dict(label=invent(rng, used, "label"), name=invent(rng, used, "name"), color=color,
                     shape=shape, year=str(rng.randint(1820, 2015)), city=rng.choice(CITIES))
                for color, shape in combos[:12]]
    ts, cell = int(image_size * 0.16), image_size // 4  # tile side; a 4 x 4 grid of cells
    text_kb = [d for i, e in enumerate(entities) for d in (
        {"id": f"e{i}-year", "text": f"{e['name']} was founded in {e['year']}.", "entity": e["name"]},
        {"id": f"e{i}-city", "text": f"{e['name']} is based in the city of {e['city']}.", "entity": e["name"]})]
    image_kb = [{"image": draw_tile(ts, COLORS[e["color"]], e["shape"], e["label"]), "name": e["name"],
                 "caption": f"The emblem of {e['name']}."} for e in entities]
    scenes, questions = [], []
    for k in range(n_scenes):
        sid = f"scene{k:03d}"
        base = tuple(rng.randint(150, 215) for _ in range(3))
        img = Image.new("RGB", (image_size, image_size), base)
        d = ImageDraw.Draw(img)
        for _ in range(12):  # background clutter: muted blobs and lines
            x, y, r = rng.randrange(image_size), rng.randrange(image_size), rng.randint(8, image_size // 5)
            tone = tuple(max(0, c - rng.randint(10, 50)) for c in base)
            d.ellipse([x - r, y - r, x + r, y + r], fill=tone) if rng.random() < 0.6 else \
                d.line([x, y, rng.randrange(image_size), rng.randrange(image_size)], fill=tone, width=3)
        picks = rng.sample(entities, 3)
        tiles = []
        for j, c in enumerate(rng.sample(range(16), 5)):  # 3 entity tiles and 2 distractors in 5 cells
            x = (c % 4) * cell + rng.randint(2, cell - ts - 2)
            y = (c // 4) * cell + rng.randint(2, cell - ts - 2)
            if j < 3:  # an entity tile
                e = picks[j]
                tile = image_kb[entities.index(e)]["image"]
                t = dict(name=e["name"], color=e["color"], shape=e["shape"], is_distractor=False,
                         label=e["label"])
            else:      # a distractor: grey outline emblem, unknown label, not in the image KB
                label = invent(rng, used | {t["label"] for t in tiles}, "label")
                shape = rng.choice(SHAPES)
                tile = draw_tile(ts, (110, 110, 110), shape, label, filled=False)
                t = dict(name=f"distractor-{label}", color="grey", shape=shape, is_distractor=True, label=label)
            img.paste(tile, (x, y))
            tiles.append(dict(t, box=[x, y, x + ts, y + ts]))
        event, city = f"{rng.choice(ADJECTIVES)} {rng.choice(EVENTS)}", rng.choice(CITIES)
        names = ", ".join(p["name"] for p in picks)
        image_kb.append({"image": img, "name": f"the {event}",
                         "caption": f"Photo of the {event}, held in {city}; emblems of {names} are on display."})
        scenes.append({"id": sid, "image": img, "tiles": tiles})
        e, g = picks[0], picks[1]   # glance/gaze target tile, and the entity named in the text question
        fact = rng.choice(["year", "city"])
        ask = {"year": "In which year was {} founded?", "city": "In which city is {} based?"}[fact]
        attr = rng.choice(["color", "shape"])
        qs = [("glance", f"What {'colour' if attr == 'color' else 'shape'} is the emblem on the tile labelled "
                         f"{e['label']}?", [e[attr]], e["name"]),
              ("text", ask.format(g["name"]), [g[fact]], None),
              ("image", "In which city was this photo taken?", [city], None),
              ("gaze", ask.format(f"the organisation whose emblem is on the tile labelled {e['label']}"),
               [e[fact]], e["name"])]
        questions += [{"id": f"{sid}-{lvl}", "scene_id": sid, "question": q, "answers": a, "level": lvl,
                       "target": tgt} for lvl, q, a, tgt in qs]
    return World(scenes, questions, text_kb, image_kb)


@functools.lru_cache(maxsize=4)
def cached_world(seed: int, n_scenes: int, image_size: int) -> World:
    return build_world(seed, n_scenes, image_size)


def world_of(args: Args) -> World:
    return cached_world(args.seed, args.n_scenes, args.image_size)


def split_world(world: World, test_frac: float) -> tuple[list[dict], list[dict]]:
    """Train / test questions, split by scene (the last scenes are held out)."""
    n_test = max(1, round(len(world.scenes) * test_frac))
    test_ids = {s["id"] for s in world.scenes[-n_test:]}
    if n_test >= len(world.scenes):
        raise UserError(f"--test_frac {test_frac} leaves no training scene; use more --n_scenes.")
    return ([q for q in world.questions if q["scene_id"] not in test_ids],
            [q for q in world.questions if q["scene_id"] in test_ids])


def as_example(world: World, q: dict) -> dict:
    """A question with its scene image and target box (original pixels), ready for rollouts."""
    scene = world.scene(q["scene_id"])
    box = next((t["box"] for t in scene["tiles"] if t["name"] == q["target"]), None)
    return dict(q, image=scene["image"], target_box=box)


def load_benchmark(path: str) -> list[dict]:
    """A benchmark's JSONL (FVQA, InfoSeek, SimpleVQA, MMSearch, LiveVQA, DynVQA):
    {"id"?, "image": path (relative to the file), "question": str, "answers": [...]} per line."""
    p = Path(path)
    rows = []
    for where, r in read_records(p, "benchmark file"):
        require(r, where, "image", "question", "answers")
        answers = [r["answers"]] if isinstance(r["answers"], str) else r["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, str) and a for a in answers):
            raise UserError(f'{where}: "answers" must be a non-empty list of strings.')
        rows.append(dict(r, id=str(r.get("id", where)), answers=answers, image=open_image(r["image"], p.parent, where),
                         level=r.get("level", p.stem), target=r.get("target")))
    return rows


# =============================================================================================
# Prompt format, tools and the oracle's trajectories (2)
# =============================================================================================
SYSTEM = """You answer questions about an image. First glance at the whole image, then decide:
- answer directly: <answer>short answer</answer>
- search text: <text_search>query</text_search>
- search with the image (your latest crop, else the whole image): <image_search></image_search>
- gaze at a region: <tool_call>{"name": "crop", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}</tool_call>
  in pixels of the image as you see it.
Think inside <reason>...</reason> before each action; one action per turn. Results come back in
the next user turn. If a crop shows the wrong region, say so and gaze again."""


def make_messages(example: dict) -> list[dict]:
    image = example["image"]
    w, h = seen_size(image)
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": f"(image: {w}x{h} pixels) {example['question']}"}]}]


def make_tools(text_search: TextSearch, image_search: ImageSearch, k: int) -> dict:
    """name -> fn(args, rollout) -> (observation, image). rollout.images[0] is the prompt image."""
    def crop_tool(args, r):   # box in the pixels the model saw -> a crop of the original image
        out, msg = crop(r.images[0], args.get("bbox_2d"), seen_size(r.images[0]))
        return msg, out
    return {"crop": crop_tool,
            "image_search": lambda args, r: (image_search.observe(r.images[-1], k=1), None),  # latest crop
            "text_search": lambda args, r: (text_search.observe(args["query"], k), None)}


def tool_limits(args: Args) -> dict:
    return {"crop": args.max_crops, "image_search": args.max_image_searches, "text_search": args.max_text_searches}


def to_seen(box: list[int], image: Image.Image) -> list[int]:
    """Original pixels -> pixels of the resized image the model sees (Qwen2.5-VL bbox_2d)."""
    w, h = seen_size(image)
    return [round(v * s) for v, s in zip(box, (w / image.width, h / image.height) * 2)]


def crop_call(box: list[int]) -> str:
    return '<tool_call>{"name": "crop", "arguments": {"bbox_2d": %s}}</tool_call>' % json.dumps(box)


def oracle_trajectory(world: World, question: dict, reflective: bool = False, rng=None,
                      gaze: bool = True) -> list[dict]:
    """Chat messages of a correct Glance -> Decision -> (Gaze -> reflect -> re-gaze) -> answer
    trajectory. Observations come from the real tools, exactly as the agent loop shows them.
    reflective: (gaze questions) first crop a wrong tile, notice it, crop the right one.
    gaze=False: the no-gaze ablation; gaze questions use whole-image search instead of a crop."""
    rng = rng or random.Random(0)
    ex = as_example(world, question)
    tools = make_tools(world.text_search, world.image_search, 3)
    r = Rollout(prompt_ids=[], images=[ex["image"]], example=ex)
    msgs = make_messages(ex)
    scene = world.scene(question["scene_id"])
    tile = next((t for t in scene["tiles"] if t["name"] == question["target"]), None)
    query = "{} founded" if "year" in question["question"] else "{} city"
    answer, target = f"<answer>{question['answers'][0]}</answer>", question["target"]

    def act(reason: str, action: str, tool: str | None = None, args: dict | None = None):
        msgs.append({"role": "assistant", "content": f"<reason>{reason}</reason>\n{action}"})
        if tool is not None:
            obs, image = tools[tool](args or {}, r)
            if image is not None:
                r.images.append(image)
            msgs.append({"role": "user", "content": ([{"type": "image", "image": image}] if image else [])
                         + [{"type": "text", "text": obs}]})

    def search_fact(reason: str, name: str):  # text search for the entity's fact, then answer
        q = query.format(name)
        act(reason, f"<text_search>{q}</text_search>", "text_search", {"query": q})
        act("The search result gives the fact.", answer)

    level = question["level"]
    if level == "glance":
        act(f"Glance: the tile labelled {tile['label']} shows a {tile['color']} {tile['shape']}. "
            f"Decision: answer directly.", answer)
    elif level == "text":
        name = next(d["entity"] for d in world.text_kb if d["entity"] in question["question"])
        search_fact(f"Glance: the image cannot tell this; {name} is named in the question. "
                    "Decision: text search.", name)
    elif level == "image":
        act("Glance: the question is about the photo as a whole. Decision: whole-image search.",
            "<image_search></image_search>", "image_search")
        act("The image search identifies the photo and where it was taken.", answer)
    elif not gaze:  # (ablation) no crop: whole-image search lists every emblem in the photo
        act(f"Glance: I need the organisation on the tile labelled {tile['label']}. Decision: whole-image search.",
            "<image_search></image_search>", "image_search")
        search_fact(f"The photo shows several emblems; the one labelled {tile['label']} is {target}.", target)
    else:
        box = to_seen(tile["box"], ex["image"])
        reason = (f"Glance: the tile labelled {tile['label']} is small and its organisation is unknown. "
                  f"Decision: gaze at it.")
        if reflective:  # a wrong crop first, then reflection and a corrected crop
            wrong = rng.choice([t for t in scene["tiles"] if t["name"] != tile["name"]])
            wrong_box = to_seen(wrong["box"], ex["image"])
            act(reason, crop_call(wrong_box), "crop", {"bbox_2d": wrong_box})
            reason = (f"Reflect: this crop shows the tile labelled {wrong['label']}, not {tile['label']}; "
                      f"wrong region. Gaze again.")
        act(reason, crop_call(box), "crop", {"bbox_2d": box})
        act(f"The crop shows the tile labelled {tile['label']}. Search with it.", "<image_search></image_search>",
            "image_search")
        search_fact(f"The emblem belongs to {target}. Now find the fact.", target)
    return msgs


# =============================================================================================
# Rewards: r = (1 - lambda) * r_acc + lambda * r_fmt (3, 4)
# =============================================================================================
def format_ok(trajectory: list[dict]) -> bool:
    """r_fmt = 1 iff every assistant turn holds one well-formed action, tools until the last
    turn and a non-empty <answer> in it."""
    kinds = [parse_action(t["text"]) for t in trajectory if t["role"] == "assistant"]
    return (bool(kinds) and all(a.kind == "tool" for a in kinds[:-1])
            and kinds[-1].kind == "answer" and bool(kinds[-1].answer))


def accuracy(answer: str | None, golds: list[str], max_answer_words: int) -> float:
    """r_acc: sub-exact match (gold inside the answer); long answers score 0 (4)."""
    if answer is None or len(answer.split()) > max_answer_words:
        return 0.0
    return sub_exact_match(answer, golds)


def gog_reward(trajectory: list[dict], answer: str | None, golds: list[str], lam: float = 0.1,
               max_answer_words: int = 10, acc: float | None = None) -> dict:
    """The GoG reward with its terms; `acc` overrides the rule judge (an LLM judge's verdict)."""
    r_acc = accuracy(answer, golds, max_answer_words) if acc is None else acc
    r_fmt = float(format_ok(trajectory))
    return {"reward": (1 - lam) * r_acc + lam * r_fmt, "acc": r_acc, "format": r_fmt}  # no tool bonus


def rollout_accs(rollouts: list[Rollout], args: Args, judge=None) -> list[float]:
    """r_acc per rollout: the LLM judge's verdict (unparsable -> 0), else sub-exact match (4)."""
    if judge is None:
        return [accuracy(r.answer, r.example["answers"], args.max_answer_words) for r in rollouts]
    verdicts = llm_judge_batch(judge, [r.example["question"] for r in rollouts], [r.answer for r in rollouts],
                               [r.example["answers"] for r in rollouts])
    return [float(v or 0.0) for v in verdicts]


def make_reward_fn(args: Args, judge=None):
    """reward_fn(group, example) for train_grpo; with a judge, r_acc is its verdict."""
    def reward_fn(group: list[Rollout], example: dict) -> list[dict]:
        return [gog_reward(r.trajectory, r.answer, example["answers"], args.lam, args.max_answer_words, a)
                for r, a in zip(group, rollout_accs(group, args, judge))]
    return reward_fn


# =============================================================================================
# Stages
# =============================================================================================
def get_policy(args: Args, adapter: str | None = None, lora: bool = True):
    return load_policy(args.model, load_in_4bit=args.load_in_4bit, lora=lora, lora_r=args.lora_r,
                       lora_alpha=args.lora_alpha, adapter=adapter,
                       gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)


def agent_rollouts(policy, examples: list[dict], args: Args, world: World, G: int, temperature: float,
                   searchers: tuple | None = None, desc: str | None = None) -> list[Rollout]:
    text_search, image_search = searchers or (world.text_search, world.image_search)
    return run_rollouts(policy, examples, num_generations=G, make_messages=make_messages,
                        tools=make_tools(text_search, image_search, args.search_k), max_turns=args.max_turns,
                        max_tool_calls=tool_limits(args), max_new_tokens=args.max_new_tokens,
                        max_total_tokens=args.max_completion_length, observation_style="user_turn",
                        temperature=temperature, desc=desc)


def messages_to_turns(msgs: list[dict]) -> list[dict]:
    """Chat messages after the prompt -> trajectory turns for the HTML page."""
    turns = []
    for m in msgs[2:]:
        if m["role"] == "assistant":
            turns.append({"role": "assistant", "text": m["content"]})
        else:
            image = next((c["image"] for c in m["content"] if c["type"] == "image"), None)
            turns.append({"role": "tool", "name": "observation", "args": {},
                          "observation": m["content"][-1]["text"], "image": image})
    return turns


def stage_data(args: Args) -> None:
    """Write the world to disk (benchmark-format JSONL + PNGs) and an oracle trajectory page."""
    world = world_of(args)
    out = Path(args.out) / "data"
    (out / "images").mkdir(parents=True, exist_ok=True)
    for s in world.scenes:
        s["image"].save(out / "images" / f"{s['id']}.png")
    for i, e in enumerate(world.image_kb):
        e["image"].save(out / "images" / f"kb{i:03d}.png")
    train, test = split_world(world, args.test_frac)
    log = RunLog(str(out))
    for name, qs in (("toy_train", train), ("toy_test", test)):
        log.samples([dict(q, image=f"images/{q['scene_id']}.png") for q in qs], f"{name}.jsonl")
    log.samples(world.text_kb, "text_kb.jsonl")
    log.samples([{"image": f"images/kb{i:03d}.png", "name": e["name"], "caption": e["caption"]}
                 for i, e in enumerate(world.image_kb)], "image_kb.jsonl")
    rng = random.Random(args.seed)
    items = [{"title": f"oracle [{q['level']}{' reflective' if refl else ''}] {q['question']}",
              "images": [world.scene(q["scene_id"])["image"]],
              "trajectory": messages_to_turns(oracle_trajectory(world, q, refl, rng))}
             for q, refl in [(q, False) for q in world.questions[:4]] + [(world.questions[3], True)]]
    trajectory_html(items, str(out / "oracle_trajectories.html"), "GoG oracle trajectories")
    levels = {lvl: sum(q["level"] == lvl for q in world.questions) for lvl in ("glance", "text", "image", "gaze")}
    summary = {"scenes": len(world.scenes), "questions": len(world.questions), "train": len(train),
               "test": len(test), "levels": levels, "text_kb": len(world.text_kb), "image_kb": len(world.image_kb)}
    log.summary(summary)
    print(f"[data] {summary} -> {out}")


def direct_pass_counts(policy, examples: list[dict], k: int, max_new_tokens: int) -> list[int]:
    """Uncertainty filter (GoG Stage 1): each question answered k times with no tools."""
    rs = run_rollouts(policy, examples, num_generations=k, make_messages=make_messages, max_turns=1,
                      max_new_tokens=max_new_tokens, temperature=1.0)
    return [sum(accuracy(r.answer, ex["answers"], 10) for r in rs[i * k:(i + 1) * k])
            for i, ex in enumerate(examples)]


def rollout_messages(r: Rollout) -> list[dict]:
    """A teacher rollout -> chat messages for SFT (observations as user turns, as sampled)."""
    msgs = make_messages(r.example)
    for t in r.trajectory:
        if t["role"] == "assistant":
            msgs.append({"role": "assistant", "content": t["text"]})
        else:
            msgs.append({"role": "user", "content": ([{"type": "image", "image": t["image"]}] if t.get("image")
                                                     else []) + [{"type": "text", "text": t["observation"]}]})
    return msgs


def run_sft(args: Args, world: World, out_dir: str, gaze: bool = True) -> str:
    """Reflective GoG Behavior Alignment: filter, build correct trajectories, LoRA SFT."""
    train, _ = split_world(world, args.test_frac)
    policy = get_policy(args)
    teacher = load_policy(args.teacher, lora=False, seed=args.seed) if args.teacher else None
    print(f"[sft] uncertainty filter with {'the teacher' if teacher else 'the base model (no --teacher)'} (6)")
    counts = direct_pass_counts(teacher or policy, [as_example(world, q) for q in train], args.filter_k,
                                args.max_new_tokens)
    kept = [q for q, c in zip(train, counts) if c < args.filter_k]   # always right -> dropped
    if not kept:
        raise UserError(f"The uncertainty filter dropped all {len(train)} questions (always answered right); "
                         f"raise --filter_k or use a weaker --teacher.")
    rng = random.Random(args.seed)
    convs = [oracle_trajectory(world, q, False, rng, gaze) for q in kept]
    reflective = [oracle_trajectory(world, q, True, rng) for q in kept  # wrong crop -> reflect -> re-gaze
                  if gaze and q["level"] == "gaze" and rng.random() < args.reflect_frac]
    good = []
    if teacher is not None:  # keep only the teacher's correct, well-formed trajectories
        ex = [as_example(world, q) for q in kept]
        rs = agent_rollouts(teacher, ex, args, world, args.teacher_samples, 1.0)
        good = [r for r in rs if gog_reward(r.trajectory, r.answer, r.example["answers"],
                                            args.lam, args.max_answer_words)["reward"] == 1.0]
    convs += reflective + [rollout_messages(r) for r in good]
    samples = [encode(policy.tokenizer, policy.image_processor, m) for m in convs]  # observations masked
    cfg = SFTConfig(learning_rate=args.sft_learning_rate, epochs=args.sft_epochs, batch_size=args.sft_batch_size,
                    micro_batch_size=args.micro_batch_size, max_steps=args.sft_max_steps, seed=args.seed)
    summary = train_sft(policy, samples, cfg, out_dir)
    no_search = sum(1 for m in convs if not any("search>" in x["content"] for x in m if x["role"] == "assistant"))
    stats = {"questions": len(train), "dropped_by_filter": len(train) - len(kept), "trajectories": len(convs),
             "reflective": len(reflective), "teacher": len(good), "no_search_frac": no_search / max(1, len(convs)),
             "gaze": gaze}
    write_json(os.path.join(out_dir, "summary.json"), {**summary, "data": stats})
    print(f"[sft] {stats} -> {out_dir}/adapter")
    return os.path.join(out_dir, "adapter")


def split_levels(pass_rates: dict[str, float], level2_max: float = 0.25, level1_max: float = 0.75,
                 min_size: int = 0) -> tuple[list[str], list[str], dict]:
    """Complexity levels from pass rates: Level 2 = p <= level2_max (mostly failed),
    Level 1 = level2_max < p <= level1_max (around 50 %); easier questions are left out.
    A level under min_size is filled with the nearest questions (Level 1: |p - 0.5|, Level 2:
    lowest p) and `expanded` says how many were added (8)."""
    l2 = sorted(q for q, p in pass_rates.items() if p <= level2_max)
    l1 = sorted(q for q, p in pass_rates.items() if level2_max < p <= level1_max)
    expanded = {"level1": 0, "level2": 0}
    for name, lvl, key in (("level1", l1, lambda q: (abs(pass_rates[q] - 0.5), q)),
                           ("level2", l2, lambda q: (pass_rates[q], q))):
        extra = [q for q in sorted(pass_rates, key=key) if q not in lvl][:max(0, min_size - len(lvl))]
        lvl += extra
        expanded[name] = len(extra)
    return l1, l2, expanded


def stage_levels(args: Args, out_dir: str | None = None) -> None:
    """Pass rate of the SFT model over levels_k agent samples per training question."""
    world, adapter, out_dir = world_of(args), start_adapter(args, "sft"), out_dir or str(Path(args.out) / "levels")
    train, _ = split_world(world, args.test_frac)
    print(f"[levels] policy: {adapter or 'the base model (no SFT adapter found)'}")
    policy = get_policy(args, adapter)
    log, k = RunLog(out_dir), args.levels_k
    accs = rollout_accs(agent_rollouts(policy, [as_example(world, q) for q in train], args, world, k,
                                       args.temperature), args)
    rates = {q["id"]: float(np.mean(accs[i * k:(i + 1) * k])) for i, q in enumerate(train)}
    l1, l2, expanded = split_levels(rates, args.level2_max, args.level1_max, args.min_level_size)
    for name, n in expanded.items():
        if n:
            print(f"[levels] {name} had fewer than {args.min_level_size} questions: added the {n} nearest by pass rate.")
    for name, ids in (("pass_rates", rates), ("level1", l1), ("level2", l2)):
        log.samples([{"id": q, "pass_rate": rates[q]} for q in ids], f"{name}.jsonl")
    hist = {f"{v:.2f}": sum(abs(p - v) < 1e-9 for p in rates.values()) for v in sorted(set(rates.values()))}
    bar_plot({"questions": hist}, os.path.join(out_dir, "pass_rates.png"), "SFT pass rate", "questions")
    log.summary({"k": k, "level1": len(l1), "level2": len(l2), "expanded": expanded, "histogram": hist,
                 "mean_pass_rate": float(np.mean(list(rates.values())))})
    print(f"[levels] Level 1: {len(l1)} questions, Level 2: {len(l2)} -> {out_dir}")


def run_rl(args: Args, world: World, adapter: str | None, levels_dir: str, out_dir: str, level: int) -> str:
    """GRPO on one complexity level with the GoG reward, multi-turn tool rollouts."""
    train, _ = split_world(world, args.test_frac)
    by_id = {q["id"]: q for q in train}
    level_file = os.path.join(levels_dir, f"level{level}.jsonl")
    if os.path.isfile(level_file):
        questions = [by_id[row["id"]] for _, row in read_records(level_file)]
        print(f"[rl] Level {level}: {len(questions)} questions from {level_file}")
    else:
        questions = train
        print(f"[rl] no {level_file} (run --stage levels): training on all {len(train)} train questions.")
    if not questions:
        raise UserError(f"Level {level} is empty; raise --min_level_size or pick --rl_level {3 - level}.")
    print(f"[rl] policy: {'SFT adapter ' + adapter if adapter else 'the base model (no SFT adapter found)'}")
    policy = get_policy(args, adapter)
    judge = load_policy(args.judge, lora=False) if args.judge else None
    cfg = grpo_config(args)
    examples = [as_example(world, q) for q in questions]
    html = []

    def on_step(step, rollouts, terms):   # keep the last step's trajectories for the page
        html[:] = [{"title": f"step {step} {r.example['question']}", "images": r.images[:1],
                    "trajectory": r.trajectory, "rewards": t} for r, t in zip(rollouts, terms)]
    train_grpo(policy, examples, lambda p, ex, c: agent_rollouts(p, ex, args, world, c.num_generations, c.temperature),
               make_reward_fn(args, judge), cfg, out_dir, on_step=on_step, resume=args.resume)
    summary = json.load(open(os.path.join(out_dir, "summary.json")))
    write_json(os.path.join(out_dir, "summary.json"), {**summary, "level": level, "start": adapter,
                                                        "questions": [q["id"] for q in questions]})
    RunLog(out_dir, resume=True).plot(["rewards/acc", "rewards/format"], "reward_terms.png", "GoG reward terms")
    trajectory_html(html, os.path.join(out_dir, "trajectories.html"), "GoG RL, last step")
    return os.path.join(out_dir, "adapter")


def box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def tool_use_stats(rollouts: list[Rollout]) -> dict:
    """The paper's tool-use statistics. A crop is right when its box (mapped back to original
    pixels) has IoU >= 0.5 with the target tile; reflection = another crop after a wrong one."""
    right, wrong, reflected = 0, 0, 0
    for r in rollouts:
        box = r.example.get("target_box")
        crops = [t["args"].get("bbox_2d") for t in r.trajectory if t["role"] == "tool" and t["name"] == "crop"]
        if box is None or not crops:
            continue
        w, h = seen_size(r.images[0])
        sx, sy = r.images[0].width / w, r.images[0].height / h
        ok = [isinstance(c, list) and len(c) == 4 and all(isinstance(v, (int, float)) for v in c)
              and box_iou([c[0] * sx, c[1] * sy, c[2] * sx, c[3] * sy], box) >= 0.5 for c in crops]
        right += sum(ok)
        first_wrong = next((i for i, o in enumerate(ok) if not o), None)
        if first_wrong is not None:
            wrong += 1
            reflected += first_wrong + 1 < len(ok)
    n = max(1, len(rollouts))
    n_crops = sum(r.tool_calls.get("crop", 0) for r in rollouts if r.example.get("target_box"))
    kinds = [sum(bool(r.tool_calls.get(t)) for t in ("text_search", "image_search")) for r in rollouts]
    return {"no_search_rate": kinds.count(0) / n, "single_type_rate": kinds.count(1) / n,
            "mixed_search_rate": kinds.count(2) / n,
            "gaze_rate": sum(r.tool_calls.get("crop", 0) > 0 for r in rollouts) / n,
            "gaze_correct_rate": right / n_crops if n_crops else None,
            "reflection_after_wrong_crop_rate": reflected / wrong if wrong else None,
            "mean_turns": float(np.mean([r.turns for r in rollouts])) if rollouts else 0.0}


def run_eval(args: Args, world: World, adapter: str | None, out_dir: str) -> dict:
    """Accuracy per split, level and benchmark; tool-use statistics; the trajectory page."""
    print(f"[eval] policy: {adapter or 'the base model (no adapter found)'}")
    policy = get_policy(args, adapter, lora=adapter is not None)
    judge = load_policy(args.judge, lora=False) if args.judge else None
    _, test = split_world(world, args.test_frac)
    sets = {"toy": ([as_example(world, q) for q in test], None)}
    files = [f for f in args.benchmarks.split(",") if f.strip()]
    if files:  # real benchmarks: their own search backends (5)
        ts = TextSearch.from_jsonl(args.text_corpus) if args.text_corpus else None
        ims = ImageSearch.from_jsonl(args.image_kb) if args.image_kb else None
        ts = ts or (TextSearch(use_env=True) if os.environ.get("TEXT_SEARCH_ENDPOINT") else world.text_search)
        ims = ims or (ImageSearch(use_env=True) if os.environ.get("IMAGE_SEARCH_ENDPOINT") else world.image_search)
        if ts is world.text_search or ims is world.image_search:
            print("[eval] benchmarks use the toy KBs for a search without --text_corpus/--image_kb or an endpoint.")
        for f in files:
            rows = [dict(r, target_box=r.get("target_box")) for r in load_benchmark(f)]
            sets[Path(f).stem] = (rows, (ts, ims))
    results = {"accuracy": {}, "tool_use": {}, "n": {}, "policy": adapter or args.model}
    html = []
    for name, (examples, searchers) in sets.items():
        rs = agent_rollouts(policy, examples, args, world, 1, args.eval_temperature, searchers, desc=f"eval {name}")
        accs = rollout_accs(rs, args, judge)
        results["accuracy"][name] = float(np.mean(accs))
        for lvl in sorted({r.example["level"] for r in rs} - {name}):
            results["accuracy"][f"{name}/{lvl}"] = float(np.mean([a for a, r in zip(accs, rs) if r.example["level"] == lvl]))
        results["tool_use"][name] = tool_use_stats(rs)
        results["n"][name] = len(rs)
        html += [{"title": f"[{name}/{r.example['level']}] {r.example['question']} (gold: {r.example['answers'][0]})",
                  "images": r.images[:1], "trajectory": r.trajectory,
                  "rewards": {"acc": a, "format": float(format_ok(r.trajectory))}} for r, a in zip(rs, accs)]
    results["Avg"] = float(np.mean([results["accuracy"][n] for n in sets]))
    write_json(os.path.join(out_dir, "results.json"), results)
    trajectory_html(html[:12], os.path.join(out_dir, "trajectories.html"), "GoG eval")
    print(f"[eval] accuracy {results['accuracy']} -> {out_dir}/results.json")
    return results


def stage_ablate(args: Args) -> None:
    """No-gaze SFT vs GoG SFT; RL on Level 1 vs Level 2. Each variant is evaluated."""
    world = world_of(args)
    out = Path(args.out)
    abl = out / "ablate"
    sft_adapter = str(out / "sft" / "adapter")
    if not os.path.isdir(sft_adapter):
        print("[ablate] no <out>/sft/adapter: running the sft stage first.")
        sft_adapter = run_sft(args, world, str(out / "sft"))
    if not os.path.isdir(out / "levels"):
        print("[ablate] no <out>/levels: running the levels stage first.")
        stage_levels(args)
    variants = {"GoG-SFT": sft_adapter,
                "SFT w/o gaze": run_sft(args, world, str(abl / "sft_no_gaze"), gaze=False),
                "RL Level 1": run_rl(args, world, sft_adapter, str(out / "levels"), str(abl / "rl_level1"), 1),
                "RL Level 2": str(out / "rl" / "adapter")}
    rl_summary = out / "rl" / "summary.json"
    if rl_summary.is_file() and json.loads(rl_summary.read_text()).get("level") == 2:
        print("[ablate] RL Level 2: reusing <out>/rl (trained on Level 2).")
    else:
        variants["RL Level 2"] = run_rl(args, world, sft_adapter, str(out / "levels"), str(abl / "rl_level2"), 2)
    table = {}
    for name, adapter in variants.items():
        res = run_eval(args, world, adapter, str(abl / ("eval_" + name.replace(" ", "_").replace("/", ""))))
        table[name] = {"Avg": res["Avg"], **res["accuracy"],
                       "mixed_search_rate": res["tool_use"]["toy"]["mixed_search_rate"],
                       "gaze_rate": res["tool_use"]["toy"]["gaze_rate"]}
    write_json(str(abl / "results.json"), {"table": table, "paper": {
        "GoG-SFT (Qwen2.5-VL-7B) Avg": 43.28, "SFT w/o Selective Gaze Avg": 41.76, "RL Level 2 > Level 1": True}})
    bar_plot({n: {k: v for k, v in row.items() if k.startswith(("toy", "Avg"))} for n, row in table.items()},
             str(abl / "ablate.png"), "GoG ablations", "accuracy")
    print("[ablate] " + " | ".join(f"{n}: Avg {row['Avg']:.3f}" for n, row in table.items()))


# `--model tiny` (and `auto` without CUDA) must run every stage in about a minute on 2 CPU
# cores, so these sizes replace the defaults above unless given on the command line.
TINY_SIZES = dict(n_scenes=4, image_size=224, max_new_tokens=24, max_completion_length=320,
                  max_steps=2, prompts_per_step=2, sft_max_steps=3, levels_k=2)


def stage_sft(args: Args) -> str:
    return run_sft(args, world_of(args), str(Path(args.out) / "sft"))


def stage_rl(args: Args) -> str:   # the papers' order: RL starts from the SFT adapter when there is one
    out = Path(args.out)
    return run_rl(args, world_of(args), start_adapter(args, "sft"), str(out / "levels"), str(out / "rl"),
                  args.rl_level)


def stage_eval(args: Args) -> dict:
    return run_eval(args, world_of(args), start_adapter(args, "rl", "sft"), str(Path(args.out) / "eval"))


def check_inputs(args: Args) -> None:
    """Every user file is read before any model is loaded."""
    for f in [f for f in args.benchmarks.split(",") if f.strip()]:
        load_benchmark(f)
    for f in (args.text_corpus, args.image_kb):
        if f:
            read_records(f, "search corpus")


def main(argv: list[str] | None = None) -> None:
    run_stages(Args, {"data": stage_data, "sft": stage_sft, "levels": stage_levels, "rl": stage_rl,
                      "eval": stage_eval, "ablate": stage_ablate}, argv, doc=__doc__, file=__file__,
               tiny=TINY_SIZES, check=check_inputs)


if __name__ == "__main__":
    main()
