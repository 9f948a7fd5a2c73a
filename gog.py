"""Glance-or-Gaze (GoG), arXiv 2601.13942 (ACL 2026 Findings): a search-augmented VLM agent glances
at the whole image, then answers, searches text, searches the whole image, or gazes (crops a region)
and searches on the crop. Stage 1 Reflective GoG Behavior Alignment (SFT), Stage 2
Complexity-Adaptive RL (GRPO), accuracy on six visual search QA benchmarks. Each stage writes
<out>/<stage>/:
    python gog.py --stage all --model tiny  # CPU: 16 s on an idle 2-core machine; numbers are noise
    python gog.py --stage data    # toy world, oracle page, scripted-policy table (no model)
    python gog.py --stage sft     # Reflective GoG Behavior Alignment: oracle (+ teacher)
                                    trajectories
    python gog.py --stage levels  # SFT pass rate over k samples -> Level 1 (~50 %) / Level 2
                                    (mostly failed)
    python gog.py --stage rl      # GRPO on Level 2, r = (1 - lambda) * acc + lambda * fmt
    python gog.py --stage eval    # held-out toy accuracy, tool use, the six benchmarks (Avg in %)
    python gog.py --stage ablate  # SFT without gaze; RL on Level 1 vs Level 2
GPU (Qwen2.5-VL-3B in NF4 + LoRA; use Qwen/Qwen2.5-VL-7B-Instruct with 24 GB):
    python gog.py --stage all --model Qwen/Qwen2.5-VL-3B-Instruct --n_scenes 400 --max_steps 300
Real benchmarks in their published files (NAME=FILE; see BENCHMARKS), or another model's answers:
    python gog.py --stage eval --benchmarks FVQA=fvqa_test.parquet,InfoSeek=infoseek_val.jsonl \
        --image_dir oven_images --text_corpus wiki.jsonl
    python gog.py --stage eval --benchmarks MMSearch=end2end.parquet --predictions answers.jsonl

Deviations from the paper (numbered; the code says "(n)" where each one lives):
 1. Data: a drawn toy world (common/standins/toyworld.py) replaces FVQA/InfoSeek (GoG-Instruct is
    not public): labelled emblem tiles, grey distractors, sparse (2) and cluttered (5) scenes; test
    entities held out.
 2. Tags (the paper's prompt is unpublished): DeepEyes' crop `<tool_call>{"name": "crop",
    "arguments": {"bbox_2d": [...]}}</tool_call>` (pixels the model saw), MMSearch-R1's
    `<text_search>q</text_search>` and `<image_search></image_search>` (whole image), an
    `image_search` tool call on the latest crop, `<reason>`, `<answer>`; results come back as user
    turns (crops as images).
 3. lambda = 0.1 (not published; MMSearch-R1's format weight). No tool-use bonus, as in GoG.
 4. r_acc is sub-exact match (answers over --max_answer_words words score 0), not gpt-oss-120b;
    `--judge <model>` is a local LLM judge everywhere (filters, levels, reward, eval).
 5. Search: BM25 over the text KB, nearest neighbour over a hand-made image embedding
    (common/tools.py); not web search, HTTP via TEXT_SEARCH_ENDPOINT / IMAGE_SEARCH_ENDPOINT.
 6. SFT trajectories: a scripted oracle that states only what the image or an observation shows (+ a
    --teacher's correct samples), not human-checked crops; the uncertainty filter uses the teacher
    or the model.
 7. SFT as in GoG (LoRA r = 8 on the LLM, lr 1e-4, 3 epochs, batch 8: the shared defaults); LoRA in
    RL too (paper: full actor, lr 2e-6), so lr 1e-5; G = 4, beta = 0.001 as in GoG; far fewer steps
    and tokens.
 8. Levels: Level 1 = pass rate in (level2_max, level1_max], Level 2 = <= level2_max, disjoint; a
    Level 2 under --min_level_size takes the next lowest pass rates (Level 1's hardest first), then
    a short Level 1 takes what neither holds, nearest 0.5; announced.
 9. Gaze correctness (the paper's humans judged it): a crop holds >= 90 % of the target tile, <= 4x
    its area.
10. --full_sft (the random-weight tiny model only; the paper uses LoRA): SFT trains every weight,
    kept in the adapter folder (common/models.py); RL trains LoRA on top.

Size: about 1,000 lines because the paper is a pipeline of five stages (data with its
scripted oracle, reflective SFT, levels, RL, eval over six benchmarks) and each stays here."""
from __future__ import annotations

import functools
import json
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from common.benchmarks.gog import (em_check, extract_answer, infoseek_score, infoseek_summary,
                                   letter_match, read_predictions, read_visual_qa, subem_check,
                                   token_f1)
from common.chat import encode
from common.cli import RunArgs, check_values, run_stages, start_adapter
from common.errors import UserError
from common.grpo import GRPOConfig, train_grpo
from common.judge import llm_judge_batch, sub_exact_match
from common.models import load_policy, run_options
from common.rollout import Rollout, run_rollouts, sharded
from common.runlog import RunLog, bar_plot, markdown_table, read_jsonl, trajectory_html, write_json
from common.sft import SFTArgs, sft_config, train_sft, trajectory_messages
from common.tools import (Grammar, ImageSearch, TextSearch, check_search_inputs, crop,
                          parse_action, seen_size)
from common.standins.toyworld import CITIES, World, build_world, by_kind, save_world, to_seen
from common.stats import wilson


@dataclass
class VisualQAArgs(RunArgs):
    """The fields that name the benchmark files and their search corpora (Args inherits them)."""
    # --- benchmarks ---
    benchmarks: str = ""
    """NAME=FILE,... in the published formats: FVQA, InfoSeek, MMSearch, SimpleVQA, LiveVQA,
    DynVQA"""
    image_dir: str | None = None
    """folder of benchmark images named <id>.<ext> or by URL file name (InfoSeek ids, DynVQA/LiveVQA
    URLs)"""
    predictions: str | None = None
    """score this file of {"id", "answer"} (another model's answers) instead of running the
    policy"""
    text_corpus: str | None = None
    """JSONL corpus for text search on benchmarks (default: the toy text KB, or
    TEXT_SEARCH_ENDPOINT)"""
    image_kb: str | None = None
    """JSONL image KB for image search on benchmarks (default: the toy image KB, or
    IMAGE_SEARCH_ENDPOINT)"""


@dataclass
class Args(VisualQAArgs, GRPOConfig, SFTArgs):
    # --- the paper's values of shared fields (their groups are common/cli.py's) ---
    stage: Literal["data", "sft", "levels", "rl", "eval", "ablate", "all"] = "all"
    """which stage to run (`all` = data, sft, levels, rl, eval, ablate)"""
    num_generations: int = 4
    """G, rollouts per question (GoG: 4)"""
    beta: float = 0.001
    """KL coefficient to pi_ref (GoG: 0.001)"""
    # --- toy world (1) ---
    n_scenes: int = 64
    """scenes in the toy world (4 questions each: glance, text, image, gaze),
    half sparse, half cluttered"""
    image_size: int = 448
    """scene side in pixels (a multiple of 28, so the model sees it unresized)"""
    test_frac: float = 0.25
    """fraction of scenes (and of entities) held out for eval"""
    # --- agent loop (2) ---
    max_turns: int = 6
    """assistant turns per rollout (a reflective gaze needs 6)"""
    max_new_tokens: int = 256
    """new tokens per assistant turn"""
    max_crops: int = 3
    """crop calls per rollout (gaze + re-gaze after reflection)"""
    max_image_searches: int = 2
    """image-search calls per rollout (whole image or crop)"""
    max_text_searches: int = 2
    """text-search calls per rollout"""
    search_k: int = 3
    """text-search hits shown to the model (the oracle's searches too)"""
    # --- SFT data (Reflective GoG Behavior Alignment) ---
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
    """fill a smaller level from the questions in neither level, nearest first, announced
    (0 = never)"""
    # --- reward, RL and eval ---
    rl_level: Literal[1, 2] = 2
    """train RL on Level 2 (GoG's final recipe) or Level 1"""
    lam: float = 0.1
    """lambda: r = (1 - lambda) * r_acc + lambda * r_fmt (3)"""
    max_answer_words: int = 10
    """answers longer than this get r_acc = 0 (sub-exact match would reward lists) (4)"""
    judge: str | None = None
    """LLM judge model for r_acc everywhere (none = sub-exact match) (4)"""
    eval_temperature: float = 0.0
    """sampling temperature in eval (0 = greedy)"""


# `--model tiny` (and `auto` without CUDA): sizes for every stage in seconds on 2 CPU cores
# (flags you pass win)
TINY_SIZES = dict(n_scenes=4, image_size=224, max_new_tokens=24, max_completion_length=320,
                  max_steps=2, prompts_per_step=2, sft_max_steps=3, levels_k=2)


# ==== data: the toy world (1: common/standins/toyworld.py, its four question kinds)
# and the six benchmarks ====
# first actions
DECISION = {"glance": "answer", "text": "text_search", "image": "image_search", "gaze": "crop"}


def world_of(args: Args) -> World:   # one world per (seed, sizes) in a process: stages share it
    return cached_world(args.seed, args.n_scenes, args.image_size, args.test_frac)


cached_world = functools.lru_cache(maxsize=4)(build_world)


def split_world(world: World) -> tuple[list[dict], list[dict]]:
    """Train / test questions (split by scene, and so by entity)."""
    return tuple([q for q in world.questions if q["split"] == split] for split in ("train", "test"))


# Each benchmark as published: the fields of its id, question, image, golds and the split a score is
# broken down by (`a.b` = nested; `items` = several questions per record; `image_is_id` = a file in
# --image_dir; `subfield` = a second breakdown; `letter` = the gold option letter; `qtype` = the
# question-type file beside the data file), its own rule (score_record, in the metrics section):
# mmsearch_r1 = EM and SubEM as MMSearch-R1 scores FVQA, infoseek = numeric ranges or alias EM,
# token_f1 = MMSearch end2end, llm_judge = the benchmark's LLM grader (a SubEM stand-in without
# --judge), sub_em_ours = no official scorer; `source` = the code our numbers follow and
# `deviations` = where ours differ from it (both copied into results.json; docs/gog.md's table).
BENCHMARKS = {
    # lmms-lab/FVQA
    "FVQA": dict(id="data_id", question="prompt", image="images", split="category",
                 score="mmsearch_r1",
                 golds=["reward_model.ground_truth", "reward_model.candidate_answers"],
                 source="EvolvingLMMs-Lab/multimodal-search-r1@583c6b4 mmsearch_r1_score.py: "
                        "em_check, subem_check (SQuAD normalisation, ASCII punctuation; SubEM is a "
                        "plain substring), extract_solution; golds = ground_truth + "
                        "candidate_answers (strings)",
                 deviations=["--predictions: the answer is the last closed <answer>..</answer> "
                             "of a prediction if it has one, else the whole prediction (a bare "
                             "answer is the answer); the official reward scores only a closed "
                             "<answer> (a bare answer scores 0 there, and its validation score "
                             "counts rewards > 0.1001)",
                             "in % of all rows; a row without a prediction counts as wrong (the "
                             "repository has no stand-alone evaluator)"]),
    # JSONL; ids in --image_dir
    "InfoSeek": dict(id="data_id", question="question", image="image_id", image_is_id=True,
                     split="data_split", golds=["answer_eval"], score="infoseek",
                     qtype="{stem}_qtype.jsonl",
                     source="edchengg/infoseek_eval@bec0c4c infoseek_eval.py evaluate() (linked "
                            "from open-vision-language/infoseek)",
                     deviations=["a split or question type without scored rows gives None (the "
                                 "official prints 0.0)"]),
    # end2end; query_image may be None
    "MMSearch": dict(id="sample_id", question="query", image="query_image", split="area",
                     subfield="subfield", score="token_f1",
                     golds=["gt_answer", "alternative_gt_answers"],
                     source="CaraJ7/MMSearch@d340f3f eval_end2end.py + score/f1_score.py: SQuAD "
                            "token F1, max over gt_answer and alternative_gt_answers; a sample "
                            "without a prediction scores 0 (denominator: every sample)",
                     deviations=["lmms-eval@75571cf averages over the answered samples only: that "
                                 "is 'F1 over answered samples (lmms-eval)'",
                                 "not the first version CaraJ7/MMSearch@5c5b1d5, which scored "
                                 "gt_answer only (superseded the next day)"]),
    # scorer not published (LLM grader)
    "SimpleVQA": dict(id="data_id", question="question", image="image", golds=["answer"],
                      split="language", score="llm_judge",
                      source="ours: the official LLM grader is unpublished",
                      deviations=["without --judge, SubEM (word boundaries) stands in for the "
                                  "LLM grader"]),
    # benchmark.json
    "LiveVQA": dict(items=["level1_qa", "level2_qa"], id="id", question="question",
                    image="img_path", golds=["Ground_Truth_List"], letter="Ground_Truth",
                    split="level", score="llm_judge",
                    source="ours: the official LLM grader (correct / incorrect / not attempted)",
                    deviations=["without --judge, SubEM (word boundaries) stands in for the LLM "
                                "grader; an answer that is the gold option letter counts"]),
    # OmniSearch JSONL, no scorer
    "DynVQA": dict(id="question_id", question="question", image="image_url", golds=["answer"],
                   split=None, score="sub_em_ours", source="ours: no official scorer found",
                   deviations=["SubEM (word boundaries), ours"]),
}


@functools.lru_cache(maxsize=16)
def load_benchmark(name: str, path: str, image_dir: str | None = None,
                   images: bool = True) -> list[dict]:
    """The records of one benchmark file; `images=False` (--predictions) reads no image."""
    return read_visual_qa(name, path, BENCHMARKS[name], image_dir, images)


def parse_benchmarks(spec: str, names) -> list[tuple[str, str]]:
    """--benchmarks NAME=FILE,... -> [(canonical name, file)]; NAME ignores case and dashes."""
    canonical, out = {n.lower().replace("-", ""): n for n in names}, []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        key, _, path = item.partition("=")
        name = canonical.get(key.lower().replace("-", ""))
        if not path or name is None:
            raise UserError(f"--benchmarks takes NAME=FILE with NAME in {', '.join(names)}, "
                            f"not {item!r}.")
        out.append((name, path))
    return out


# ==== prompt + parsing: the tags (2), the tools, and scripted policies that state only what
# they saw (6) ==
SYSTEM = """You answer questions about an image. First glance at the whole image, then decide:
- answer directly: <answer>short answer</answer>
- search text: <text_search>query</text_search>
- search with the whole image: <image_search></image_search>
- gaze at a region: <tool_call>{"name": "crop", "arguments": """ \
    """{"bbox_2d": [x1, y1, x2, y2]}}</tool_call>
  in pixels of the image as you see it; then search with the crop:
  <tool_call>{"name": "image_search", "arguments": {"image": "crop"}}</tool_call>
Think inside <reason>...</reason> before each action; one action per turn. Results come back in
the next user turn. If a crop shows the wrong region, say so and gaze again."""
GRAMMAR = Grammar(tags={"text_search": "text_search", "image_search": "image_search",
                        "tool_call": "tool_call", "answer": "answer"},
                  tool_names={"crop": "crop", "image_search": "image_search"},
                  free=("reason",))
CROP_CALL = '<tool_call>{"name": "crop", "arguments": {"bbox_2d": %s}}</tool_call>'
CROP_SEARCH = '<tool_call>{"name": "image_search", "arguments": {"image": "crop"}}</tool_call>'


def make_messages(example: dict) -> list[dict]:
    if example["image"] is None:  # MMSearch has text-only queries
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": example["question"]}]
    text = "(image: {}x{} pixels) {}".format(*seen_size(example["image"]), example["question"])
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image", "image": example["image"]},
                                         {"type": "text", "text": text}]}]


def make_tools(text_search: TextSearch, image_search: ImageSearch, k: int) -> dict:
    """name -> fn(args, rollout) -> (observation, image); image search uses the prompt image
    or the latest crop."""
    def crop_tool(args, r):   # box in the pixels the model saw -> a crop of the original image
        if not r.images:
            return "Error: there is no image to crop.", None
        out, msg = crop(r.images[0], args.get("bbox_2d"), seen_size(r.images[0]))
        return msg, out

    def image_search_tool(args, r):
        on_crop = args.get("image") == "crop"
        if on_crop and len(r.images) < 2:
            return "Error: there is no crop yet; crop a region first.", None
        which = f"crop {len(r.images) - 1}" if on_crop else "the whole image"
        image = r.images[-1] if on_crop else (r.images or [None])[0]
        return f"Searched with {which}.\n" + image_search.observe(image, k=1), None

    def text_search_tool(args, r):
        return text_search.observe(args["query"], k), None
    return {"crop": crop_tool, "image_search": image_search_tool, "text_search": text_search_tool}


def benchmark_searchers(text_corpus: str | None, image_kb: str | None, fallback: tuple) -> tuple:
    """(text, image) search for real benchmarks (5): a JSONL corpus, else the HTTP endpoint
    (TEXT_SEARCH_ENDPOINT / IMAGE_SEARCH_ENDPOINT), else the `fallback` engines, announced."""
    ts = ims = None
    if text_corpus or os.environ.get("TEXT_SEARCH_ENDPOINT"):
        ts = TextSearch.from_jsonl(text_corpus) if text_corpus else TextSearch(use_env=True)
    if image_kb or os.environ.get("IMAGE_SEARCH_ENDPOINT"):
        ims = ImageSearch.from_jsonl(image_kb) if image_kb else ImageSearch(use_env=True)
    if ts is None or ims is None:
        print("[eval] benchmarks use the toy KBs for a search without --text_corpus/--image_kb or "
              "an endpoint.")
    return ts or fallback[0], ims or fallback[1]


# the text KB's sentences (common/standins/toyworld.py)
FACT_RE = {"year": re.compile(r"(\w+) was founded in (\d+)"),
           "city": re.compile(r"(\w+) is based in the city of (\w+)")}
VERB = {"year": "was founded in", "city": "is based in"}
POLICIES = ("gaze oracle", "whole-image oracle", "never search", "random tool")


def learn(known: dict, obs: str) -> None:
    """Note what an observation shows: facts (text search), a crop's owner, the photo's town
    and emblems."""
    for fact, pattern in FACT_RE.items():
        for name, value in pattern.findall(obs):
            known["facts"].setdefault(name, {})[fact] = value
    owner = re.search(r"Title: (\w+)\) The emblem of", obs)
    if owner and known.get("crop_label") and "Searched with crop" in obs:
        known["owner"][known["crop_label"]] = owner.group(1)
    photo = re.search(r"held in (\w+); emblems of (.+) are on display", obs)
    if photo:
        known["place"], known["candidates"] = photo.group(1), photo.group(2).split(", ")


def answer_from(known: dict, q: dict, tile: dict | None, rng: random.Random) -> tuple[str, str]:
    """(answer, reason) from the image and what the observations showed; a guess says so."""
    kind, fact = q["kind"], q["fact"]
    if kind == "glance":   # visible in the image
        return (tile[fact],
                f"The tile labelled {tile['label']} shows a {tile['color']} {tile['shape']}.")
    if kind == "image":
        if known.get("place"):
            return known["place"], f"The image search says the photo was taken in {known['place']}."
        return rng.choice(CITIES), "Nothing I saw names the town; this is a guess."
    name = q["entity"] if kind == "text" else known["owner"].get(q["label"]) or known.get("guess")
    value = known["facts"].get(name, {}).get(fact)
    if value:
        return value, f"The search result says {name} {VERB[fact]} {value}."
    return (rng.choice(CITIES) if fact == "city" else str(rng.randint(1820, 2015)),
            "Nothing I saw tells this; a guess.")


def random_action(q: dict, known: dict, tiles: list[dict], rng: random.Random) -> tuple | None:
    """The random-tool policy: any action, arguments drawn from what it has seen."""
    choice = rng.choice(["answer", "text_search", "image_search", "crop", "crop_search"])
    names = ([q["entity"]] * (q["kind"] == "text") + known["candidates"]
             + list(known["owner"].values()))
    # both drawn, whatever the choice
    query, tile = rng.choice(names or [q["question"]]), rng.choice(tiles)
    return {"answer": None, "text_search": ("text_search", {"query": query}, "Try a text search."),
            "image_search": ("image_search", {}, "Try a whole-image search."),
            "crop": ("crop", {"tile": tile}, "Try a crop."),
            "crop_search": ("image_search", {"image": "crop"},
                            "Try an image search with the crop.")}[choice]


def next_action(policy: str, q: dict, known: dict, tiles: list[dict], tile: dict | None,
                rng: random.Random, done: list[str],
                reflective: bool) -> tuple[str, dict, str] | None:
    """(tool, args, reason) of the policy's next step, or None to answer now."""
    kind, label, need = q["kind"], q["label"], f"the tile labelled {q['label']}"
    if policy in ("never search", "random tool"):
        return None if policy == "never search" else random_action(q, known, tiles, rng)
    name = q["entity"] if kind == "text" else known["owner"].get(label) or known.get("guess")
    if kind == "text" and name not in known["facts"]:
        why = (f"Glance: the image cannot tell this; the question names {name}. "
               f"Decision: text search.")
        return "text_search", {"query": name}, why
    if kind == "image" and not known.get("place"):
        return ("image_search", {},
                "Glance: the question is about the photo as a whole. Decision: whole-image search.")
    if kind != "gaze" or (name and name in known["facts"]):
        return None
    # (ablation) no crop: the whole-image search lists every emblem
    if policy == "whole-image oracle":
        if not known["candidates"]:
            return ("image_search", {},
                    f"Glance: I need the organisation on {need}. Decision: whole-image search.")
        known["guess"] = rng.choice(known["candidates"])
        why = (f"The photo shows the emblems of {', '.join(known['candidates'])}; I cannot tell "
               f"which is on {need}.")
        return "text_search", {"query": known["guess"]}, f"{why} I guess {known['guess']}."
    if "crop" not in done:   # a reflective trajectory gazes at a wrong tile first
        wrong = [t for t in tiles if t is not tile]
        if reflective and wrong:
            return ("crop", {"tile": rng.choice(wrong)},
                    f"Glance: {need} is small. Decision: gaze at it.")
        return ("crop", {"tile": tile},
                f"Glance: {need} is small and its organisation unknown. Decision: gaze at it.")
    if known.get("crop_label") != label:
        return ("crop", {"tile": tile},
                f"Reflect: the crop shows the tile labelled {known['crop_label']}, "
                f"not {label}; wrong region. Gaze again.")
    if label not in known["owner"]:
        return "image_search", {"image": "crop"}, f"The crop shows {need}. Search with the crop."
    return ("text_search", {"query": name},
            f"The image search says the emblem belongs to {name}. Now find the fact.")


def scripted_episode(world: World, q: dict, policy: str = "gaze oracle", reflective: bool = False,
                     rng=None, searchers: tuple | None = None, k: int = 3,
                     max_turns: int = 6) -> tuple[list, str]:
    """A scripted policy's trajectory (turns as the agent loop records them) and answer, with the
    real tools; reasons and answers use only the image and earlier observations, never memory."""
    rng, ex = rng or random.Random(0), world.example(q)
    tools = make_tools(*(searchers or world.searchers(q["split"])), k)
    r = Rollout(prompt_ids=[], images=[ex["image"]], example=ex)
    tiles = world.scene(q["scene_id"])["tiles"]
    tile = next((t for t in tiles if t["label"] == q["label"]), None)
    known, turns, done = {"facts": {}, "owner": {}, "candidates": []}, [], []
    while (len(turns) // 2 < max_turns - 1
           and (step := next_action(policy, q, known, tiles, tile, rng, done, reflective))):
        tool, args, reason = step
        if tool == "crop":
            known["crop_label"] = args["tile"]["label"]
            args = {"bbox_2d": to_seen(args["tile"]["cell"], ex["image"])}
        text = {"crop": CROP_CALL % json.dumps(args.get("bbox_2d", [])),
                "text_search": f"<text_search>{args.get('query')}</text_search>",
                "image_search": (CROP_SEARCH if args.get("image")
                                 else "<image_search></image_search>")}[tool]
        obs, image = tools[tool](args, r)
        if image is not None:
            r.images.append(image)
        learn(known, obs)
        done.append(tool)
        turns += [{"role": "assistant", "text": f"<reason>{reason}</reason>\n{text}"},
                  {"role": "tool", "name": tool, "args": args, "observation": obs, "image": image}]
    answer, reason = answer_from(known, q, tile, rng)
    return turns + [{"role": "assistant",
                     "text": f"<reason>{reason}</reason>\n<answer>{answer}</answer>"}], answer


# ==== rewards + metrics: r = (1 - lambda) * r_acc + lambda * r_fmt (3, 4),
# and the tool-use statistics ==
def format_ok(trajectory: list[dict]) -> bool:
    """r_fmt = 1 iff every assistant turn holds one well-formed action: tools, then a
    non-empty <answer>."""
    kinds = [parse_action(t["text"], GRAMMAR) for t in trajectory if t["role"] == "assistant"]
    return (bool(kinds) and all(a.kind == "tool" for a in kinds[:-1])
            and kinds[-1].kind == "answer" and bool(kinds[-1].answer))


def accuracy(answer: str | None, golds: list[str], max_answer_words: int) -> float:
    """r_acc: sub-exact match (gold inside the answer); long answers score 0 (4)."""
    return (0.0 if answer is None or len(answer.split()) > max_answer_words
            else sub_exact_match(answer, golds))


def gog_reward(trajectory: list[dict], answer: str | None, golds: list[str], lam: float = 0.1,
               max_answer_words: int = 10, acc: float | None = None) -> dict:
    """The GoG reward with its terms; `acc` overrides the rule judge (an LLM judge's verdict)."""
    r_acc = accuracy(answer, golds, max_answer_words) if acc is None else acc
    r_fmt = float(format_ok(trajectory))
    # no tool bonus
    return {"reward": (1 - lam) * r_acc + lam * r_fmt, "acc": r_acc, "format": r_fmt}


@functools.lru_cache(maxsize=2)
def load_judge(name: str | None):
    return load_policy(name, lora=False) if name else None


def rollout_accs(rollouts: list[Rollout], args: Args) -> list[float]:
    """r_acc of each rollout: the --judge model's verdict (unparsable -> 0),
    else sub-exact match (4)."""
    answers, golds = [r.answer for r in rollouts], [r.example["answers"] for r in rollouts]
    judge = load_judge(args.judge)
    if judge is None:
        return [accuracy(a, g, args.max_answer_words) for a, g in zip(answers, golds)]
    return [float(v or 0.0)
            for v in llm_judge_batch(judge, [r.example["question"] for r in rollouts],
                                     answers, golds)]


def make_reward_fn(args: Args):
    """reward_fn(group, example) for train_grpo; with a judge, r_acc is its verdict."""
    def reward_fn(group: list[Rollout], example: dict) -> list[dict]:
        return [gog_reward(r.trajectory, r.answer, example["answers"], args.lam,
                           args.max_answer_words, a)
                for r, a in zip(group, rollout_accs(group, args))]
    return reward_fn


def crop_is_right(box: list[float], target: list[float]) -> bool:
    """(9) The crop holds >= 90 % of the target tile and is at most 4x its area."""
    ix = max(0.0, min(box[2], target[2]) - max(box[0], target[0]))
    iy = max(0.0, min(box[3], target[3]) - max(box[1], target[1]))
    area = (target[2] - target[0]) * (target[3] - target[1])
    return ix * iy >= 0.9 * area and (box[2] - box[0]) * (box[3] - box[1]) <= 4 * area


def first_decision(trajectory: list[dict]) -> str:
    """The first action: answer / text_search / image_search (whole image) / crop, else none."""
    a = parse_action(next((t["text"] for t in trajectory if t["role"] == "assistant"), ""), GRAMMAR)
    tool = (("image_search_crop" if a.args.get("image") == "crop" else a.name)
            if a.kind == "tool" else "none")
    return "answer" if a.kind == "answer" else tool


def tool_use_stats(rollouts: list[Rollout]) -> dict:
    """The paper's tool-use statistics in %: search mix, gaze rate, gaze correctness (9),
    reflection = another crop after a wrong one, decision accuracy (first action = the oracle's)."""
    right = n_crops = wrong = reflected = 0
    for r in rollouts:
        box, image = r.example.get("target_box"), r.images[0] if r.images else None
        crops = [t["args"].get("bbox_2d") for t in r.trajectory
                 if t["role"] == "tool" and t["name"] == "crop"]
        if box is None or image is None or not crops:
            continue
        w, h = seen_size(image)
        sx, sy = image.width / w, image.height / h
        ok = [isinstance(c, list) and len(c) == 4 and all(isinstance(v, (int, float)) for v in c)
              and crop_is_right([c[0] * sx, c[1] * sy, c[2] * sx, c[3] * sy], box) for c in crops]
        right, n_crops = right + sum(ok), n_crops + len(ok)
        if not all(ok):   # reflection: another crop after the first wrong one
            wrong, reflected = wrong + 1, reflected + (ok.index(False) + 1 < len(ok))
    n = max(1, len(rollouts))
    kinds = [sum(bool(r.tool_calls.get(t)) for t in ("text_search", "image_search"))
             for r in rollouts]
    decided = [first_decision(r.trajectory) == DECISION.get(r.example.get("kind")) for r in rollouts
               if r.example.get("kind") in DECISION]
    return {"no_search_rate": 100 * kinds.count(0) / n,
            "single_type_rate": 100 * kinds.count(1) / n,
            "mixed_search_rate": 100 * kinds.count(2) / n,
            "gaze_rate": 100 * sum(r.tool_calls.get("crop", 0) > 0 for r in rollouts) / n,
            "gaze_correct_rate": 100 * right / n_crops if n_crops else None,
            "reflection_after_wrong_crop_rate": 100 * reflected / wrong if wrong else None,
            "decision_accuracy": 100 * float(np.mean(decided)) if decided else None,
            "format_rate": (100 * float(np.mean([format_ok(r.trajectory) for r in rollouts]))
                            if rollouts else None),
            "mean_turns": float(np.mean([r.turns for r in rollouts])) if rollouts else 0.0}


# Each benchmark's rule (BENCHMARKS[name]["score"]); the official scorers: common.benchmarks.gog
LMMS_F1 = "F1 over answered samples (lmms-eval)"


def score_record(rule: str, pred: str | None, golds: list, judged: float | None = None,
                 letter: str | None = None) -> dict:
    """Per-record metrics under the benchmark's rule; `judged` is the LLM judge's verdict
    (if any), `letter` LiveVQA's gold option letter (an answer that is that letter counts)."""
    strings = [str(g) for g in golds]
    if rule == "mmsearch_r1":   # golds: the strings, as MMSearch-R1's reward manager keeps them
        text = extract_answer(pred)
        text, golds = pred if text is None else text, [g for g in golds if isinstance(g, str)]
        m = {"EM": em_check(text, golds), "SubEM": subem_check(text, golds)}
    elif rule == "infoseek":
        m = {"InfoSeek": infoseek_score(pred, golds)}
    elif rule == "token_f1":
        m = {"F1": max(token_f1(pred, g) for g in strings)}
    elif rule == "llm_judge":
        hit = letter_match(pred, letter)
        m = {"SubEM (rule stand-in for the LLM grader)": max(sub_exact_match(pred, strings), hit)}
        judged = 1.0 if judged is not None and hit else judged
    elif rule == "sub_em_ours":
        m = {"SubEM (ours; no official scorer)": sub_exact_match(pred, strings)}
    else:
        raise ValueError(f"unknown scoring rule {rule!r}")
    if judged is not None:
        m["LLM judge"] = judged
    return m


def mean_pct(values: list[float]) -> float | None:
    return 100 * float(np.mean(values)) if values else None


def by_group(records: list[dict], scores: list[dict], field: str) -> dict:
    """{group: {metric: mean in %, "n": rows}} of the records' `field`."""
    groups = {}
    for r, s in zip(records, scores):
        groups.setdefault(str(r.get(field)), []).append(s)
    return {g: {**{k: mean_pct([s[k] for s in ss]) for k in ss[0]}, "n": len(ss)}
            for g, ss in groups.items()}


def summarize_benchmark(name: str, records: list[dict], scores: list[dict],
                        answered: list[bool] | None = None) -> dict:
    """Mean of each metric in % (by split, and by subfield where the benchmark has one), with the
    source it follows and our deviations from it. `answered` (--predictions: a prediction in the
    file): InfoSeek counts only answered rows and reports its evaluator's final score; MMSearch
    adds lmms-eval's mean over the answered samples."""
    spec, n = BENCHMARKS[name], len(records)
    answered = [True] * n if answered is None else answered
    deviations = list(spec["deviations"])
    if spec["score"] == "infoseek":   # the evaluator counts only the rows with a prediction
        summary = infoseek_summary(records, [s["InfoSeek"] if a else None
                                             for s, a in zip(scores, answered)])
        if not all(r.get("qtype") for r in records):
            deviations.append("no question-type file (<name>_qtype.jsonl) beside the data file: "
                              "numerical = a range in answer_eval; score_time and score_string "
                              "need the file")
        records = [r for r, a in zip(records, answered) if a]
        scores = [s for s, a in zip(scores, answered) if a]
    out = {k: mean_pct([s[k] for s in scores]) for k in scores[0]} if scores else {}
    out["by_split"] = by_group(records, scores, "split")
    if spec.get("subfield"):
        out["by_subfield"] = by_group(records, scores, "subfield")
    if spec["score"] == "token_f1":
        out[LMMS_F1] = mean_pct([s["F1"] for s, a in zip(scores, answered) if a])
    if spec["score"] == "infoseek":
        out = {**out, "InfoSeek": summary.pop("final_score"), **summary}
    first = "InfoSeek" if spec["score"] == "infoseek" else list(scores[0])[0] if scores else None
    out["headline"] = "LLM judge" if "LLM judge" in out else first
    return {**out, "n": n, "source": spec["source"], "deviations": deviations}


def score_benchmark(name: str, rule: str, records: list[dict], answers: list,
                    judged: list | None = None, answered: list[bool] | None = None) -> dict:
    """Every record under the benchmark's rule -> its summary in %, and how many answers are
    missing. `judged`: the LLM judge's verdicts (None = unparsable: wrong here, and counted in
    judge_unparsable)."""
    verdicts = [None] * len(records) if judged is None else [0.0 if j is None else j
                                                              for j in judged]
    scores = [score_record(rule, a, r["golds"], j, r.get("letter"))
              for a, r, j in zip(answers, records, verdicts)]
    out = {**summarize_benchmark(name, records, scores, answered),
           "missing_answers": sum(a is None for a in answers)}
    if judged is not None:
        out["judge_unparsable"] = sum(j is None for j in judged)
    return out


def score_benchmarks(benches: list[tuple[str, list[dict]]], answers: dict[str, list], table: dict,
                     judge=None, from_file: bool = False) -> dict[str, dict]:
    """{name: score_benchmark(...)} for each (name, records) under its rule table[name]["score"];
    with an LLM judge (a loaded policy), its verdict on each answer is scored too. `from_file`:
    the answers come from --predictions, so None means no prediction for that record."""
    out = {}
    for name, recs in benches:
        judged = (llm_judge_batch(judge, [r["question"] for r in recs], answers[name],
                                  [r["answers"] for r in recs])
                  if judge is not None else None)
        answered = [a is not None for a in answers[name]] if from_file else None
        out[name] = score_benchmark(name, table[name]["score"], recs, answers[name], judged,
                                    answered)
    return out


# ==== stages ======================================================================================
def get_policy(args: Args, adapter: str | None = None, lora: bool = True):
    """The policy for a stage; an adapter of a --full_sft run brings its base weights (10)."""
    return load_policy(args.model, **run_options(args), lora=lora, adapter=adapter)


def agent_rollouts(policy, examples: list[dict], args: Args, searchers: tuple, G: int,
                   temperature: float, desc: str | None = None) -> list[Rollout]:
    limits = {"crop": args.max_crops, "image_search": args.max_image_searches,
              "text_search": args.max_text_searches}
    return run_rollouts(policy, examples, num_generations=G, make_messages=make_messages, desc=desc,
                        tools=make_tools(*searchers, args.search_k), grammar=GRAMMAR,
                        max_turns=args.max_turns, temperature=temperature, max_tool_calls=limits,
                        max_new_tokens=args.max_new_tokens,
                        max_total_tokens=args.max_completion_length, observation_style="user_turn")


def sharded_rollouts(policy, examples: list[dict], args: Args, searchers: tuple, G: int,
                     temperature: float, desc: str | None = None) -> list[Rollout]:
    """agent_rollouts with the examples split over the ranks (torchrun) and the rollouts gathered
    in order (common.rollout.sharded); one process: agent_rollouts."""
    return sharded(lambda part: agent_rollouts(policy, part, args, searchers, G, temperature,
                                               desc), examples)


def policy_table(world: World, args: Args) -> dict:
    """Accuracy (%) of each scripted policy on held-out scenes: whole-image search must lose
    on cluttered gaze."""
    rng, test, table = random.Random(args.seed), split_world(world)[1], {}
    for policy in POLICIES:
        answers = [scripted_episode(world, q, policy, rng=rng, k=args.search_k,
                                    max_turns=args.max_turns)[1]
                   for q in test]
        accs = [accuracy(a, q["answers"], args.max_answer_words) for a, q in zip(answers, test)]
        table[policy] = {**by_kind(test, accs), "all": 100 * float(np.mean(accs)) if accs else None}
    return table


def table_intervals(world: World, table: dict) -> dict:
    """Per cell of policy_table: n (held-out questions) and the Wilson 95 % interval in %."""
    test = split_world(world)[1]
    n = {**Counter(q["kind"] for q in test),
         **Counter(f"gaze/{q['clutter']}" for q in test if q["kind"] == "gaze"), "all": len(test)}
    return {"n": n, "ci95": {p: {c: [100 * x for x in wilson(v / 100 * n[c], n[c])]
                                 for c, v in row.items() if v is not None and n.get(c)}
                             for p, row in table.items()}}


def gaze_chance(world: World) -> dict:
    """Expected gaze accuracy (%) of the two policies that guess, from the world's facts: never
    search guesses a city (1/len(CITIES)) or a year in 1820-2015 (1/196); the whole-image oracle
    picks one of the photo's emblems at random, right when that emblem shares the asked fact."""
    test = [q for q in split_world(world)[1] if q["kind"] == "gaze"]
    facts = {e["name"]: e for e in world.entities}
    cells: dict = defaultdict(lambda: defaultdict(list))
    for q in test:
        names = [t["name"] for t in world.scene(q["scene_id"])["tiles"]
                 if not t.get("is_distractor")]
        whole = np.mean([facts[x][q["fact"]] == q["answers"][0] for x in names])
        never = 1 / len(CITIES) if q["fact"] == "city" else 1 / 196
        for cell in ("gaze", f"gaze/{q['clutter']}"):
            cells["whole-image oracle"][cell].append(whole)
            cells["never search"][cell].append(never)
    return {p: {c: 100 * float(np.mean(v)) for c, v in by.items()} for p, by in cells.items()}


def stage_data(args: Args) -> None:
    """Write the world (JSONL + PNGs), the oracle page and the scripted-policy table."""
    world, out = world_of(args), str(Path(args.out) / "data")
    counts = save_world(world, out)
    rng, first = random.Random(args.seed), world.questions[:4]
    cases = ([(q, False, "gaze oracle") for q in first]
             + [(first[3], True, "gaze oracle"), (first[3], False, "whole-image oracle")])
    items = [{"title": f"{policy} [{q['kind']}{' reflective' * refl}] {q['question']} "
                       f"(gold: {q['answers'][0]})",
              "images": [world.scene(q["scene_id"])["image"]],
              "trajectory": scripted_episode(world, q, policy, refl, rng, k=args.search_k,
                                             max_turns=args.max_turns)[0]}
             for q, refl, policy in cases]
    trajectory_html(items, f"{out}/oracle_trajectories.html",
                    "GoG scripted trajectories (tool, arguments, observation)")
    table = policy_table(world, args)
    spread, chance = table_intervals(world, table), gaze_chance(world)
    write_json(f"{out}/scripted_policies.json",
               {"units": "accuracy in % on held-out scenes", "image_size": args.image_size,
                "table": table, **spread, "gaze_chance": chance,
                "note": "ci95: Wilson intervals over the held-out questions of each cell; "
                        "gaze_chance: the guessing policies' expected gaze accuracy"})
    # the console gives every rate in 0-1 (as the other four scripts); the files keep GoG's %
    print("[data] scripted policies, accuracy (0-1) on held-out scenes:\n"
          + markdown_table(table, "policy", "{:.2f}", 0.01))
    print(f"[data] n per cell {spread['n']}; guessing policies' expected gaze (0-1): "
          + "; ".join(f"{p} " + ", ".join(f"{c} {v / 100:.2f}" for c, v in by.items())
                      for p, by in chance.items()))
    print(f"[data] {counts['scenes']} scenes, {counts['train_questions']} train / "
          f"{counts['test_questions']} test questions -> {out}")


def oracle_data(world: World, questions: list[dict], args: Args,
                gaze: bool = True) -> list[tuple[dict, list]]:
    """(question, turns) of the oracle's correct trajectories (training-time search), a
    reflect_frac share of gaze questions twice (reflective); gaze=False: the no-gaze ablation's
    whole-image oracle."""
    rng, out = random.Random(args.seed), []
    runs = [(q, False) for q in questions] + [(q, True) for q in questions
                                              if gaze and q["kind"] == "gaze"
                                              and rng.random() < args.reflect_frac]
    for q, refl in runs:
        turns, answer = scripted_episode(world, q, "gaze oracle" if gaze else "whole-image oracle",
                                         refl, rng, world.searchers("train"), args.search_k,
                                         args.max_turns)
        if accuracy(answer, q["answers"], args.max_answer_words) == 1.0:
            out.append((q, turns))
    return out


def run_sft(args: Args, world: World, out_dir: str, gaze: bool = True) -> str:
    """Reflective GoG Behavior Alignment: uncertainty filter, correct trajectories, LoRA SFT."""
    train, policy = split_world(world)[0], get_policy(args)
    teacher = load_policy(args.teacher, lora=False, seed=args.seed) if args.teacher else None
    print(f"[sft] uncertainty filter with "
          f"{'the teacher' if teacher else 'the model itself (no --teacher)'} (6)")
    # split by rank and gathered (torchrun): every rank keeps the same questions, so the ranks
    # train on shares of the same SFT data (train_sft refuses data that differ between ranks)
    direct = sharded(lambda part: run_rollouts(
        teacher or policy, part, num_generations=args.filter_k, make_messages=make_messages,
        max_turns=1, max_new_tokens=args.max_new_tokens, temperature=1.0),
        [world.example(q) for q in train])
    # (questions,) pass rates
    rates = np.reshape(rollout_accs(direct, args), (-1, args.filter_k)).mean(axis=1)
    kept = [q for q, p in zip(train, rates) if p < 1.0]   # always right -> dropped
    if not kept:
        raise UserError(f"The uncertainty filter dropped all {len(train)} questions "
                        f"(always answered right); raise --filter_k or use a weaker --teacher.")
    convs = [trajectory_messages(make_messages(world.example(q)), turns)
             for q, turns in oracle_data(world, kept, args, gaze)]
    n_oracle, good = len(convs), []
    if teacher is not None:  # keep only the teacher's correct, well-formed trajectories
        rs = sharded_rollouts(teacher, [world.example(q) for q in kept], args,
                              world.searchers("train"), args.teacher_samples, 1.0)
        good = [r for r, a in zip(rs, rollout_accs(rs, args))
                if a == 1.0 and format_ok(r.trajectory)]
    convs += [trajectory_messages(make_messages(r.example), r.trajectory) for r in good]
    # observations masked
    samples = [encode(policy.tokenizer, policy.image_processor, m) for m in convs]
    if args.full_sft:   # (10) every weight trains; the adapter folder holds the base weights too
        policy.train_all_weights()
    summary = train_sft(policy, samples, sft_config(args), out_dir)
    no_search = sum(not any("search" in x["content"] for x in m if x["role"] == "assistant")
                    for m in convs)
    stats = {"questions": len(train), "dropped_by_filter": len(train) - len(kept),
             "oracle": n_oracle, "teacher": len(good),
             "no_search_fraction": no_search / max(1, len(convs)), "gaze": gaze}
    write_json(os.path.join(out_dir, "summary.json"), {**summary, "data": stats})
    print(f"[sft] {stats} -> {out_dir}/adapter")
    return os.path.join(out_dir, "adapter")


def stage_sft(args: Args) -> str:
    return run_sft(args, world_of(args), str(Path(args.out) / "sft"))


def split_levels(pass_rates: dict[str, float], level2_max: float = 0.25, level1_max: float = 0.75,
                 min_size: int = 0) -> tuple[list[str], list[str], dict]:
    """Complexity levels (8): Level 2 = p <= level2_max (mostly failed), Level 1 =
    level2_max < p <= level1_max (around 50 %). A Level 2 under min_size takes the next lowest
    pass rates (Level 1's hardest first: never questions the SFT model always solves while harder
    ones exist); a Level 1 under min_size then takes what neither level holds, nearest 0.5. They
    stay disjoint; `expanded` says how many were added, with their pass rates."""
    l2 = sorted(q for q, p in pass_rates.items() if p <= level2_max)
    l1 = sorted(q for q, p in pass_rates.items() if level2_max < p <= level1_max)
    others = sorted((q for q in pass_rates if q not in l2), key=lambda q: (pass_rates[q], q))
    extra2 = others[:max(0, min_size - len(l2))]
    l2, l1 = l2 + extra2, [q for q in l1 if q not in extra2]
    rest = [q for q in sorted(pass_rates) if q not in l1 and q not in l2]
    extra1 = sorted(rest, key=lambda q: (abs(pass_rates[q] - 0.5), q))[:max(0, min_size - len(l1))]
    l1 = l1 + extra1
    expanded = {name: {"added": len(extra), "pass_rates": sorted(pass_rates[q] for q in extra)}
                for name, extra in (("level2", extra2), ("level1", extra1))}
    return l1, l2, expanded


def stage_levels(args: Args) -> None:
    """Pass rate of the SFT model over levels_k agent samples per training question."""
    world, adapter = world_of(args), start_adapter(args, "sft")
    out_dir = str(Path(args.out) / "levels")
    train, k = split_world(world)[0], args.levels_k
    print(f"[levels] policy: {adapter or 'the base model (no SFT adapter found)'}")
    rs = sharded_rollouts(get_policy(args, adapter), [world.example(q) for q in train], args,
                          world.searchers("train"), k, args.temperature, desc="levels")
    rates = {q["id"]: float(p)
             for q, p in zip(train, np.reshape(rollout_accs(rs, args), (-1, k)).mean(axis=1))}
    l1, l2, expanded = split_levels(rates, args.level2_max, args.level1_max, args.min_level_size)
    for name, e in ((n, e) for n, e in expanded.items() if e["added"]):
        print(f"[levels] {name} had fewer than {args.min_level_size} questions: "
              f"added {e['added']} ({'the next lowest' if name == 'level2' else 'nearest 0.5'}),"
              f" pass rates {e['pass_rates']}.")
    log = RunLog(out_dir)
    for name, ids in (("pass_rates", rates), ("level1", l1), ("level2", l2)):
        log.samples([{"id": q, "pass_rate": rates[q]} for q in ids], f"{name}.jsonl")
    hist = {f"{v:.2f}": sum(abs(p - v) < 1e-9 for p in rates.values())
            for v in sorted(set(rates.values()))}
    bar_plot({"questions": hist}, f"{out_dir}/pass_rates.png", f"SFT pass rate over {k} samples",
             "questions", "pass rate (share of the samples answered right)")
    log.summary({"k": k, "level1": len(l1), "level2": len(l2), "expanded": expanded,
                 "histogram": hist, "mean_pass_rate": float(np.mean(list(rates.values())))})
    print(f"[levels] Level 1: {len(l1)} questions, Level 2: {len(l2)} -> {out_dir}")


def level_ids(levels_dir: str | Path, level: int) -> list[str] | None:
    """The question ids of <levels_dir>/level<level>.jsonl, or None without that file."""
    path = Path(levels_dir) / f"level{level}.jsonl"
    return [r["id"] for r in read_jsonl(str(path))] if path.is_file() else None


def run_rl(args: Args, world: World, adapter: str | None, levels_dir: str, out_dir: str,
           level: int) -> str:
    """GRPO on one complexity level with the GoG reward, multi-turn tool rollouts."""
    train, ids = split_world(world)[0], level_ids(levels_dir, level)
    level_file = f"{levels_dir}/level{level}.jsonl"
    by_id = {q["id"]: q for q in train}
    questions = train if ids is None else [by_id[i] for i in ids if i in by_id]
    print(f"[rl] Level {level}: {len(questions)} questions from {level_file}"
          if ids is not None else
          f"[rl] no {level_file} (run --stage levels): "
          f"training on all {len(train)} train questions.")
    if not questions:
        raise UserError(f"Level {level} is empty; "
                        f"raise --min_level_size or pick --rl_level {3 - level}.")
    print(f"[rl] policy: "
          f"{'SFT adapter ' + adapter if adapter else 'the base model (no SFT adapter found)'}")
    policy, searchers, html = get_policy(args, adapter), world.searchers("train"), []

    def rollout_fn(p, examples, c):
        return agent_rollouts(p, examples, args, searchers, c.num_generations, c.temperature)

    def on_step(step, rollouts, terms):   # keep the last step's trajectories for the page
        html[:] = [{"title": f"step {step} {r.example['question']}", "images": r.images[:1],
                    "trajectory": r.trajectory, "rewards": t} for r, t in zip(rollouts, terms)]
    summary = train_grpo(policy, [world.example(q) for q in questions], rollout_fn,
                         make_reward_fn(args), GRPOConfig.of(args), out_dir, on_step=on_step,
                         resume=args.resume)
    write_json(os.path.join(out_dir, "summary.json"),
               {**summary, "level": level, "start": adapter,
                "questions": [q["id"] for q in questions]})
    RunLog(out_dir, resume=True).plot(["reward", "rewards/acc", "rewards/format"],
                                      "reward_terms.png", "GoG reward terms")
    trajectory_html(html, os.path.join(out_dir, "trajectories.html"), "GoG RL, last step")
    return os.path.join(out_dir, "adapter")


# the papers' order: RL starts from the SFT adapter when there is one
def stage_rl(args: Args) -> str:
    out = Path(args.out)
    return run_rl(args, world_of(args), start_adapter(args, "sft"), str(out / "levels"),
                  str(out / "rl"), args.rl_level)


def run_eval(args: Args, world: World, adapter: str | None, out_dir: str) -> dict:
    """Held-out toy accuracy and tool use, and each benchmark under its own rule; all in %."""
    benches = [(n, load_benchmark(n, f, args.image_dir, images=not args.predictions))
               for n, f in parse_benchmarks(args.benchmarks, BENCHMARKS)]
    results = {"units": "percent (mean_turns in turns)",
               "policy": args.predictions or adapter or args.model,
               "toy": "not run: --predictions scores the benchmark files only",
               "benchmarks": {}, "Avg": None}
    answers, html = {}, []
    if args.predictions:
        preds = read_predictions(args.predictions)
        answers = {n: [preds.get(r["id"]) for r in recs] for n, recs in benches}
        for n, a in answers.items():
            if None in a:
                print(f"[eval] {n}: {a.count(None)} of {len(a)} questions without an answer in "
                      f"{args.predictions} (scored as wrong).")
    else:
        print(f"[eval] policy: {adapter or 'the base model (no adapter found)'}")
        policy = get_policy(args, adapter, lora=adapter is not None)
        rs = sharded_rollouts(policy, [world.example(q) for q in split_world(world)[1]], args,
                              world.searchers("test"), 1, args.eval_temperature, desc="eval toy")
        accs = rollout_accs(rs, args)
        kinds = {k: v for k, v in by_kind([r.example for r in rs], accs).items() if v is not None}
        results["toy"] = {"accuracy": 100 * float(np.mean(accs)), "n": len(rs),
                          "tool_use": tool_use_stats(rs), "by_kind": kinds}
        html = [{"title": f"[{r.example['kind']}] {r.example['question']} "
                          f"(gold: {r.example['answers'][0]})",
                 "images": r.images[:1], "trajectory": r.trajectory,
                 "rewards": {"acc": a, "format": float(format_ok(r.trajectory))}}
                for r, a in zip(rs, accs)]
        searchers = (benchmark_searchers(args.text_corpus, args.image_kb, world.searchers("test"))
                     if benches else None)
        # (5) --text_corpus / --image_kb, else the endpoints, else the toy KBs
        for n, recs in benches:
            rs = sharded_rollouts(policy, list(recs), args, searchers, 1, args.eval_temperature,
                                  desc=f"eval {n}")
            answers[n], results["benchmarks"][n] = ([r.answer for r in rs],
                                                    {"tool_use": tool_use_stats(rs)})
    # each under its own rule
    scored = score_benchmarks(benches, answers, BENCHMARKS, load_judge(args.judge),
                              from_file=bool(args.predictions))
    for n, scores in scored.items():
        results["benchmarks"][n] = {**results["benchmarks"].get(n, {}), **scores}
    heads = [b[b["headline"]] if b["headline"] else None for b in results["benchmarks"].values()]
    if benches and None not in heads:   # the paper's Avg: the real benchmarks, each its headline
        results["Avg"] = float(np.mean(heads))
    write_json(os.path.join(out_dir, "results.json"), results)
    if html:
        trajectory_html(html[:12], os.path.join(out_dir, "trajectories.html"),
                        "GoG eval (held-out scenes)")
    toy = results["toy"]["accuracy"] if isinstance(results["toy"], dict) else None
    # the console in 0-1 (results.json keeps GoG's %); Avg exists only with every benchmark scored
    print(f"[eval] toy accuracy {'n/a' if toy is None else f'{toy / 100:.3f}'}, Avg "
          + (f"{results['Avg'] / 100:.3f}" if results["Avg"] is not None
             else "n/a (no --benchmarks given)" if not benches else "n/a (a benchmark unscored)")
          + f" (0-1) -> {out_dir}/results.json (there in %)")
    return results


def stage_eval(args: Args) -> dict:
    return run_eval(args, world_of(args), start_adapter(args, "rl", "sft"),
                    str(Path(args.out) / "eval"))


def stage_ablate(args: Args) -> None:
    """No-gaze SFT vs GoG SFT; RL on Level 1 vs Level 2, each evaluated; says what it reuses
    and what it trains."""
    world, out, abl = world_of(args), Path(args.out), Path(args.out) / "ablate"
    sft, ran = start_adapter(args, "sft"), ["SFT w/o gaze"]
    if not sft:
        sft, ran = run_sft(args, world, str(out / "sft")), ran + ["GoG-SFT"]
    if level_ids(out / "levels", 2) is None:
        stage_levels(args)
        ran.append("levels")
    variants = {"GoG-SFT": sft,
                "SFT w/o gaze": run_sft(args, world, str(abl / "sft_no_gaze"), gaze=False)}
    rl2 = out / "rl" / "summary.json"
    for level in (1, 2):
        if level == 2 and rl2.is_file() and json.loads(rl2.read_text()).get("level") == 2:
            variants["RL Level 2"] = str(out / "rl" / "adapter")
        elif level_ids(out / "levels", level):
            variants[f"RL Level {level}"] = run_rl(args, world, sft, str(out / "levels"),
                                                   str(abl / f"rl_level{level}"), level)
            ran.append(f"RL Level {level}")
    reused = [n for n in variants if n not in ran]
    table = {f"RL Level {v}": "skipped: the level is empty" for v in (1, 2)
             if f"RL Level {v}" not in variants}
    print(f"[ablate] reuses {', '.join(reused) or 'nothing'} from earlier stages; "
          f"trains {', '.join(ran)}; skips {', '.join(table) or 'nothing'} (empty level).")
    for name, adapter in variants.items():
        res = run_eval(args, world, adapter,
                       str(abl / ("eval_" + name.replace(" ", "_").replace("/", ""))))
        toy = res["toy"]
        table[name] = {"Avg": res["Avg"], "toy": toy["accuracy"],
                       **{f"toy/{k}": v for k, v in toy["by_kind"].items()},
                       **{k: toy["tool_use"][k] for k in ("mixed_search_rate", "gaze_rate")}}
    paper = {"GoG-SFT (Qwen2.5-VL-7B) Avg": 43.28, "SFT w/o Selective Gaze Avg": 41.76,
             "RL Level 2 > Level 1": True}
    write_json(str(abl / "results.json"),
               {"units": "percent", "reused": reused, "trained": ran, "table": table,
                "paper": paper})
    bar_plot({n: {k: v for k, v in row.items() if k.startswith(("toy", "Avg"))}
              for n, row in table.items() if isinstance(row, dict)},
             str(abl / "ablate.png"), "GoG ablations (held-out toy scenes)", "accuracy (%)",
             "benchmark (toy/<kind>: the toy questions of that kind)", ymax=100)
    print("[ablate] "
          + " | ".join(f"{n}: toy accuracy {row['toy'] / 100:.3f}" if isinstance(row, dict)
                       else f"{n}: {row}"
                       for n, row in table.items()))


# ==== main ========================================================================================
def check_inputs(args: Args) -> None:
    """Every user file and value is checked before any model is loaded."""
    check_values(args, {
        "image_size": (lambda v: v >= 56, ">= 56 (the toy scenes need two 28-pixel patches)"),
        "n_scenes": (lambda v: v >= 2, ">= 2 (a training and a test scene)"),
        "test_frac": (lambda v: 0 < v < 1, "in (0, 1)"),
        **{k: (lambda v: v >= 1, ">= 1") for k in ("max_turns", "max_new_tokens", "search_k",
                                                    "levels_k", "teacher_samples", "filter_k",
                                                    "max_answer_words")},
        **{k: (lambda v: v >= 0, ">= 0") for k in ("max_crops", "max_image_searches",
                                                    "max_text_searches", "min_level_size",
                                                    "eval_temperature")},
        "reflect_frac": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "lam": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "level2_max": (lambda v: 0 <= v <= args.level1_max <= 1,
                       "in [0, --level1_max] with --level1_max <= 1")})
    benches = [(name, load_benchmark(name, path, args.image_dir, images=not args.predictions))
               for name, path in parse_benchmarks(args.benchmarks, BENCHMARKS)]
    if args.predictions:
        if not args.benchmarks:
            raise UserError("--predictions needs --benchmarks NAME=FILE to score them against.")
        preds = read_predictions(args.predictions)
        if not any(r["id"] in preds for _, recs in benches for r in recs):
            raise UserError(f"no id in {args.predictions} matches a question of --benchmarks; "
                            f"key each answer by its benchmark's id (data_id, sample_id, id).")
    check_search_inputs(args.text_corpus, args.image_kb)


def main(argv: list[str] | None = None) -> None:
    run_stages(Args, {"data": stage_data, "sft": stage_sft, "levels": stage_levels, "rl": stage_rl,
                      "eval": stage_eval, "ablate": stage_ablate}, argv, doc=__doc__, file=__file__,
               tiny=TINY_SIZES, check=check_inputs)


if __name__ == "__main__":
    main()
