"""PRMs for thinking with images: a step-labelled trajectory format, a toy set built by step
builders from an auditable error-injection table, LVLM-as-PRM evaluation with the benchmarks' own
metrics, and PRM-guided best-of-N. "What, Whether and How? Unveiling Process Reward Models for
Thinking with Images Reasoning", arXiv 2602.08346.

    python prm_bench.py --stage all --model tiny     # CPU, 16 s (idle 2 cores):
                                                     data -> eval -> search; noise
    python prm_bench.py --stage all --model Qwen/Qwen2.5-VL-3B-Instruct --n_scenes 40
        --search_questions 40
    python prm_bench.py --stage eval --benchmark visualprocessbench --data VPB/test.jsonl
        --images VPB/images
    python prm_bench.py --stage eval --benchmark processbench --data ProcessBench/gsm8k.json
        # or prmbench
    python prm_bench.py --stage eval --data my.jsonl --predictions my_prm.jsonl
        # scores of any external PRM

Record (a JSONL line; paths relative to --images; common.benchmarks.prm_bench.validate_prm_record
checks it): {"id", "question", "images": [path], "answers": [str], "final_answer", "category",
"subcategory", "source", "injected": [{"step", "error_type"}], "steps": [{"text",
"tool_call": null | {"name", "arguments"}, "observation", "tool_image": path | null,
"knowledge": [fact] | null, "label": correct | incorrect | neutral | null, "error_type"}]}.
A null label (not annotated) may only follow an incorrect step; search/candidates.jsonl holds the
policy's trajectories unlabelled.
Predictions: {"id", "scores": [per step: a score in [0, 1], true/false,
             a verdict ("Incorrect", "+"), or null]}; a converted row without an id is named by
             its line ("3"), PRMBench's as `<classification>_<idx>`.

Metrics (eval/results.json). null = undefined (0/0), where PRMBench's code writes -1 and
ProcessBench's numpy gives nan. A step is judged correct when its score > --threshold (0.5;
PRMBench's rule: 0.5 itself is incorrect).
  PRMBench (ssmisya/PRMBench mr_eval/tasks/prmtest_classified/task.py evaluate_function; the
    PRMScore and class groups of its result notebooks): clean = class `correct` (the originals
    of its redundency rows), kept out of the overall counts; every step the PRM scored, also
    after the first error; from summed counts f1 (correct steps), negative_f1, precision,
    recall (their correct_step_acc), negative_precision, negative_recall (wrong_step_acc),
    accuracy (total_step_acc); first_error_acc; similarity (|share judged correct - that of
    the clean twin|, twins at 0 skipped as theirs); PRMScore = 0.5 f1 + 0.5 negative_f1
    (multi_solutions: f1), overall, per class and as the group means simplicity / soundness /
    sensitivity. A sample with an unparsed step is invalid and left out (their `validity`).
  VisualProcessBench: macro_f1 as VisualPRM's paper describes; official evaluator not found
    (ours, named `metric` in the results): mean of F1(correct) and F1(incorrect), neutral and
    unparsed steps dropped, over all steps pooled and per data_source.
  ProcessBench (QwenLM/ProcessBench code/run_eval.py): prediction = the first step judged
    incorrect, else -1; unparsable (never equal to the label, like their unreadable answer)
    when an unparsed or unscored step comes first; acc_err, acc_corr and their harmonic mean
    F1, as fractions (run_eval.py prints x100).
  Predictions are read as PRMBench's evaluator reads them: the first row of a repeated id
  counts; a short row leaves its last steps unjudged; a PRMBench record's scores past its last
  step count against its published error_steps.
Deviations (numbered; "(n)" marks where each lives):
 1. The paper's 1,206 trajectories are not public: the toy set is built on gog.py's toy world
    (common/standins/toyworld.py) by the step builders of common/standins/prm_steps.py.
 2. ERRORS, TAXONOMY and the toy kinds are ours (the paper names 2 of its 7 error types).
 3. Toy labels: a step is incorrect when it does something wrong itself; a step that correctly
    builds on an earlier mistake is correct (PRMBench's error_steps). Knowledge steps carry the
    KB facts they use.
 4. The PRM sees the question images and the latest crop made at or before the judged step.
 5. `--prm prob` = P(+) / (P(+) + P(-)) of the next token (Math-Shepherd, VisualPRM), not a value
    head.
 6. Nothing is trained (no sft/rl stage); --max_steps caps the trajectories judged in eval.
 7. PRMBench's code returns -1 where precision and recall are both 0 (TP = 0 with FP, FN > 0);
    here that F1 is 0. PRMBench's notebooks add the -1 into that PRMScore (their main table
    clamps the negative result to 0, their appendix keeps it); here that PRMScore is half the
    other F1, and a PRMScore (or group mean) with an undefined F1 is null.
 8. Every record needs a predictions row (a row of nulls = an invalid sample); PRMBench's
    evaluator accepts up to 4 missing records and counts them as invalid.
 9. A text-only policy (SmolLM2) cannot see the scene: in the search stage it reads the scene
    in words (each tile's label, box, emblem and organisation, and their KB facts) and has no
    crop tool; its turns are its steps; before its last turn it is asked for the answer only,
    and a bare reply of at most 4 words counts as its answer when it wrote no <answer> tags
    (SmolLM2-135M never wrote them in a probe). The paper's policies are LVLMs that crop.

Size: about 1,000 lines because the paper's seven error types, its labelling rule, every
benchmark metric (PRMBench, ProcessBench, VisualProcessBench) and PRM-guided search stay here."""
from __future__ import annotations

import functools
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from common.benchmarks.prm_bench import load_prm_records, prm_record_images, read_prm_predictions
from common.chat import collate, encode
from common.cli import RunArgs, check_values, run_stages
from common.distributed import gather_in_order, require_same_on_every_rank, run_sharded, shard
from common.errors import UserError
from common.judge import exact_match, normalize_answer, parse_verdict
from common.models import load_policy, run_options
from common.rollout import run_rollouts
from common.generate import image_token_id
from common.runlog import RunLog, bar_plot, trajectory_html, write_json
from common.stats import bootstrap_ci, wilson
from common.tools import Grammar, crop, parse_action, seen_size
from common.standins.prm_steps import TOY_BUILDERS, Toy, direction, prm_step, step_retry, tag
from common.standins.toyworld import World, build_world


@dataclass
class Args(RunArgs):
    stage: Literal["data", "eval", "search", "all"] = "all"
    """which stage to run (`all` = data, eval, search)"""
    # --- toy data (1) ---
    n_scenes: int = 6
    """scenes of gog.py's toy world; each gives 4 toy questions
    (attribute, fact, relation, count)"""
    image_size: int = 448
    """scene side in pixels (the tiny preset: 224, 8x fewer vision tokens on a CPU)"""
    p_clean: float = 0.3
    """share of toy trajectories without an error"""
    p_multi: float = 0.3
    """share of the erroneous toy trajectories with two errors (at different steps)"""
    p_recover: float = 0.5
    """chance that a wrong crop is noticed and redone (a recovery); a broken tool call is
    always retried"""
    # --- eval: benchmark files and the PRM ---
    benchmark: Literal["ours", "visualprocessbench", "processbench", "prmbench"] = "ours"
    """format of --data: ours | VisualProcessBench test.jsonl | ProcessBench split .json |
    PRMBench .jsonl"""
    data: str | None = None
    """trajectories to evaluate (none = <out>/data/toy.jsonl from the data stage)"""
    images: str | None = None
    """folder the --data image paths are relative to (none = the folder of --data)"""
    predictions: str | None = None
    """JSONL of per-step scores or verdicts from an external PRM,
    scored instead of running --model"""
    max_steps: int = 0
    """cap on trajectories judged in eval (0 = all) (6)"""
    prm: Literal["judge", "prob"] = "judge"
    """judge = prompted Correct/Incorrect verdict;
    prob = P(+) / (P(+) + P(-)) next-token score (5)"""
    prm_adapter: str | None = None
    """peft adapter of a trained PRM loaded onto --model (none = the base model as PRM)"""
    threshold: float = 0.5
    """a step is judged correct when its score > threshold (PRMBench's rule: a score of
    exactly 0.5 is judged incorrect)"""
    judge_max_new_tokens: int = 8
    """tokens the judge may write (the verdict is the earliest Correct/Incorrect in them)"""
    batch_size: int = 16
    """PRM prompts per batch"""
    # --- search: best-of-N ---
    search_source: Literal["policy", "toy"] = "policy"
    """best-of-N candidates: policy = sampled from --model (a VLM with the crop tool; a
    text-only model reads the scene in words (9)); toy = simulated (toy errors)"""
    search_questions: int = 4
    """questions in the search stage"""
    search_n: str = "1,2,4,8"
    """N values for best-of-N; the largest is the candidates sampled per question"""
    search_repeats: int = 64
    """random N-subsets of the candidates per question (selection noise is averaged out)"""
    max_turns: int = 3
    """assistant turns (= steps) per policy trajectory"""
    max_completion_length: int = 48
    """new tokens per policy turn"""
    temperature: float = 1.0
    """policy sampling temperature"""


TINY_SIZES = dict(image_size=224)
N_BUCKETS = 4  # relative step-position buckets


# ==== data: taxonomy, the error-injection table (2), the toy set on gog.py's world (1, 3), files ==
ALL_KINDS = ("attribute", "fact", "relation", "count")
# error type: (the toy step role it corrupts, toy kinds it is injected in, what that step does)
ERRORS = {
    "tool_invocation": ("crop", ALL_KINDS,
                        "a malformed call (reversed box, 3 numbers, unknown tool, box "
                        "off the image); the next step retries it (a recovery)"),
    "region_selection": ("crop", ("attribute", "fact", "count"),
                         "a valid crop that misses the evidence; "
                         "with p_recover the next step notices and redoes it"),
    "visual_perception": ("perceive", ALL_KINDS,
                          "misreads the crop: the asked colour or shape, the emblem, "
                          "a colour, one tile's shape"),
    "relationship_understanding": ("relate", ("relation",),
                                   "names the decoy tile as the one in the asked direction"),
    "knowledge_hallucination": ("recall", ("fact",),
                                "a founding year or city that contradicts the KB facts shown"),
    "logical_calculation": ("count", ("count",), "counts the tiles it listed off by one"),
    "answer_format": ("answer", ALL_KINDS,
                      "no <answer> tags, or an answer other than the value the steps reached"),
}
TAXONOMY = {  # ours (2): 4 categories x 4 subcategories
    "perception": ("attribute", "text_reading", "small_object", "fine_detail"),
    "spatial": ("relative_position", "layout", "size_comparison", "orientation"),
    "knowledge": ("entity_recognition", "fact_lookup", "multi_hop", "commonsense"),
    "reasoning": ("counting", "arithmetic", "chart_table", "geometry"),
}
# toy kind -> ((category, subcategory), its step roles after an optional plan)
KINDS = {"attribute": (("perception", "attribute"), ("crop", "perceive", "answer")),
         "fact": (("knowledge", "fact_lookup"), ("crop", "perceive", "recall", "answer")),
         "relation": (("spatial", "relative_position"), ("crop", "perceive", "relate", "answer")),
         "count": (("reasoning", "counting"), ("crop", "perceive", "count", "answer"))}


def toy_questions(world: World, rng: random.Random) -> list[dict]:
    """Four questions per scene on gog.py's world: its glance (attribute) and gaze (fact)
    questions, plus our relation and counting questions computed from the tile boxes."""
    specs = []
    for scene in world.scenes:
        tiles = scene["tiles"]
        for q in world.questions:
            # gog.py's question kind (called level before its issue 14)
            kind = q.get("kind", q.get("level"))
            if q["scene_id"] == scene["id"] and kind in ("glance", "gaze"):
                target = next(t for t in tiles if t["name"] == q["target"])
                specs.append(dict(kind="attribute" if kind == "glance" else "fact", id=q["id"],
                                  scene=scene, question=q["question"], answers=q["answers"],
                                  target=target,
                                  attr="color" if q["answers"][0] == target["color"] else "shape",
                                  fact="year" if q["answers"][0].isdigit() else "city"))
        # relation: the only tile in one direction from an anchor
        for a in rng.sample(tiles, len(tiles)):
            by_dir = {}
            for b in tiles:
                if b is not a:
                    by_dir.setdefault(direction(a["box"], b["box"]), []).append(b)
            options = [(d, bs[0]) for d, bs in by_dir.items()
                       if len(bs) == 1 and any(t["color"] != bs[0]["color"] for t in tiles
                                               if t is not a and t is not bs[0])]
            if options:
                rel, b = rng.choice(options)
                d = rng.choice([t for t in tiles if t is not a and t is not b
                                and t["color"] != b["color"]])
                specs.append(dict(kind="relation", id=f"{scene['id']}-relation", scene=scene,
                                  rel=rel,
                                  question=f"What colour is the emblem on the tile {rel} "
                                           f"the tile labelled {tag(a)}?",
                                  answers=[b["color"]], anchor=a, target=b, decoy=d))
                break
        shape = rng.choice([t["shape"] for t in tiles])
        specs.append(dict(kind="count", id=f"{scene['id']}-count", scene=scene, shape=shape,
                          question=f"How many tiles in the image show a {shape} emblem?",
                          answers=[str(sum(t["shape"] == shape for t in tiles))]))
    return specs


def toy_trajectory(spec: dict, world: World, errors: dict[str, str], rng: random.Random, rid: str,
                   plan: bool = True, recover: bool = False) -> dict:
    """One trajectory: [plan] + the kind's roles, each built by TOY_BUILDERS[role]
    (common.standins.prm_steps); `errors` maps a role to the error type injected there (ERRORS says
    which fit). A broken call is retried; a wrong crop is redone when `recover`. Every step is
    labelled by what it does itself (3)."""
    roles = KINDS[spec["kind"]][1]
    for role, e in errors.items():
        if ERRORS[e][0] != role or spec["kind"] not in ERRORS[e][1]:
            raise ValueError(f"ERRORS does not inject {e} at the {role} step "
                             f"of a {spec['kind']} trajectory.")
    t = Toy(spec, world, rng, GRAMMAR)
    for role in ("plan",) * plan + roles:
        TOY_BUILDERS[role](t, errors.get(role))
        if (errors.get(role) == "tool_invocation"
                or (errors.get(role) == "region_selection" and recover)):
            step_retry(t, errors[role])
    final = parse_action(t.steps[-1]["text"], GRAMMAR)
    injected = [{"step": i, "error_type": s["error_type"]}
                for i, s in enumerate(t.steps) if s["error_type"]]
    return scene_record(spec, rid, t.steps, t.crops,
                        final.answer if final.kind == "answer" else None, "toy", injected=injected)


def scene_record(spec: dict, rid: str, steps: list[dict], crops: dict, final_answer: str | None,
                 source: str, **extra) -> dict:
    """A record on a toy scene (toy or policy trajectory); step i's crop is
    images/<rid>-s<i>.png."""
    for i in crops:
        steps[i]["tool_image"] = f"images/{rid}-s{i}.png"
    (category, subcategory), _ = KINDS[spec["kind"]]
    return {"id": rid, "question": spec["question"],
            "images": [f"images/{spec['scene']['id']}.png"],
            "answers": spec["answers"], "final_answer": final_answer, "category": category,
            "subcategory": subcategory, "source": source, **extra, "steps": steps,
            "_pil": {"images": [spec["scene"]["image"]], "steps": crops}}


def draw_errors(kind: str, n: int, used: Counter, rng: random.Random) -> dict[str, str]:
    """n error types for a `kind` trajectory at different roles, the least used first
    (ties at random)."""
    errors: dict[str, str] = {}
    for _ in range(n):
        free = sorted(e for e, (role, kinds, _) in ERRORS.items()
                      if kind in kinds and role not in errors)
        e = rng.choice([x for x in free if used[x] == min(used[y] for y in free)])
        used[e] += 1
        errors[ERRORS[e][0]] = e
    return errors


def build_toy_set(world: World, seed: int, p_clean: float, p_multi: float = 0.3,
                  p_recover: float = 0.5, specs: list[dict] | None = None,
                  copies: int = 1) -> list[dict]:
    """`copies` trajectories per toy question: clean with p_clean, else one error (two with
    p_multi); a plan step with chance 1/2, so errors sit at varied positions."""
    rng, used, records = random.Random(seed), Counter(), []
    for spec in specs or toy_questions(world, rng):
        for c in range(copies):
            n = 0 if rng.random() < p_clean else 2 if rng.random() < p_multi else 1
            records.append(toy_trajectory(spec, world, draw_errors(spec["kind"], n, used, rng), rng,
                                          spec["id"] + (f"-c{c}" if copies > 1 else ""),
                                          plan=rng.random() < 0.5,
                                          recover=rng.random() < p_recover))
    return records


def load_records(path: str, require_labels: bool = True, benchmark: str = "ours",
                 images: str | None = None):
    """The trajectories of `path` (ours, or a published benchmark's file converted), checked
    against TAXONOMY."""
    return load_prm_records(path, TAXONOMY, ERRORS, require_labels, benchmark, images)


def load_benchmark(args: Args) -> list[dict]:
    """The trajectories eval judges: --data (a --benchmark file) or the data stage's toy set,
    capped (6)."""
    records = load_records(args.data or str(Path(args.out) / "data" / "toy.jsonl"),
                           benchmark=args.benchmark, images=args.images)
    return records[: args.max_steps] if args.max_steps > 0 else records


def read_predictions(path: str, records: list[dict]) -> list[list[dict]]:
    """An external PRM's {"id", "scores": [per step]} rows -> the judgements of `records`,
    in their order (common.benchmarks.prm_bench.read_prm_predictions says which rows count;
    each record needs one (8))."""
    rows = read_prm_predictions(path, records)
    short = sum(len(x) < len(r["steps"]) for x, r in zip(rows, records))
    if short:
        print(f"[prm_bench] {path}: {short} records have fewer scores than steps; "
              f"their last steps are not judged (left out of every count).")
    return [[{"score": parse_step_verdict(x), "reply": str(x)} for x in scores] for scores in rows]


def save_prm_records(records: list[dict], path: Path) -> None:
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


def prm_html_items(records: list[dict], judged: list[list[dict]] | None = None) -> list[dict]:
    """Records (and the PRM's judgements) -> items of common.runlog.trajectory_html."""
    items = []
    for j, rec in enumerate(records):
        images, step_images = prm_record_images(rec)
        turns = []
        for i, s in enumerate(rec["steps"]):
            js = judged[j][i] if judged and i < len(judged[j]) else None
            prm = (f" | PRM {'unparsed' if js['score'] is None else js['score']} "
                   f"({js['reply'][:80]!r})" if js
                   else " | PRM: not scored" if judged else "")
            turns.append({"role": "assistant",
                          "text": f"[{i}] {s['text']}\n   gold: {s['label']} "
                                  f"{s['error_type'] or ''}{prm}"})
            if s.get("tool_call"):
                call = s["tool_call"]
                turns.append({"role": "tool", "name": call["name"],
                              "args": call.get("arguments", {}),
                              "observation": s.get("observation") or "",
                              "image": step_images.get(i)})
        title = f"{rec['id']} [{rec['category']}/{rec['subcategory']}] {rec['question']}"
        items.append({"title": title, "images": images, "trajectory": turns,
                      "rewards": {"gold": ", ".join(rec["answers"]),
                                  "final": str(rec["final_answer"])}})
    return items


def write_set(records: list[dict], out: Path, name: str, title: str, **load_kw) -> None:
    """<out>/<name>.jsonl (+ PNGs), checked by its own validator, and <out>/<name>.html."""
    save_prm_records(records, out / f"{name}.jsonl")
    load_records(str(out / f"{name}.jsonl"), **load_kw)
    trajectory_html(prm_html_items(records[:12]), str(out / f"{name}.html"), title)


# ==== prompt + parsing: the policy with the crop tool; the LVLM as PRM (4, 5) =====================
SYSTEM = """You answer questions about an image step by step, one short step per turn.
To look closer, zoom in: <tool_call>{"name": "crop", "arguments": """ \
    """{"bbox_2d": [x1, y1, x2, y2]}}</tool_call>
in pixels of the image as you see it; the zoomed image comes back in the next turn.
End with <answer>short answer</answer>."""
GRAMMAR = Grammar(tags={"tool_call": "tool_call", "answer": "answer"}, tool_names={"crop": "crop"})


def make_messages(ex: dict) -> list[dict]:
    """The policy's prompt: the question image and its size as the model sees it (crop boxes
    are in it)."""
    w, h = seen_size(ex["image"])
    return [{"role": "system", "content": SYSTEM},
            {"role": "user",
             "content": [{"type": "image", "image": ex["image"]},
                         {"type": "text", "text": f"(image: {w}x{h} pixels) {ex['question']}"}]}]


TEXT_SYSTEM = """You answer questions about an image described in words, step by step, one short
step per turn. When you know it, write the answer in tags, for example <answer>red</answer>."""
REPROMPT = "Continue with the next step, or give the final <answer>."
LAST_CALL = ("Now reply with the final answer only (a word or a number) "
             "in tags: <answer>...</answer>")


def last_call_answer(r, max_turns: int) -> str | None:
    """A text-only policy's answer: its <answer>, else its reply to the last call when that is a
    bare answer of at most 4 words on one line, its end punctuation dropped (9); else none."""
    turns = [t for t in r.trajectory if t["role"] == "assistant"]
    if r.answer is not None or max_turns < 2 or len(turns) < max_turns:
        return r.answer
    reply = turns[-1]["text"].strip().rstrip(".!").strip()
    return reply if reply and "\n" not in reply and len(reply.split()) <= 4 else None


def text_nudge(r, turns: int, max_turns: int) -> str | None:
    """A text-only policy's next user turn: none once it answered, the last call before its
    final turn, else the nudge for the next step."""
    return None if r.answer is not None else LAST_CALL if turns == max_turns - 1 else REPROMPT


def describe_scene(spec: dict, world: World) -> str:
    """The scene in words, for a text-only policy (9): each tile's label, box, emblem and the
    organisation it stands for (a distractor stands for none), and those organisations' KB
    facts (what the crop and the searches would have shown a VLM)."""
    tiles = spec["scene"]["tiles"]
    names = {t["name"] for t in tiles}
    return "\n".join([f"The image shows {len(tiles)} tiles (boxes in pixels, x1 y1 x2 y2):"]
                     + [f"- tile {tag(t)} at {t['box']}: a {t['color']} {t['shape']} emblem"
                        + ("" if t.get("is_distractor") else f", the emblem of {t['name']}")
                        for t in tiles]
                     + [k["text"] for k in world.text_kb if k["entity"] in names])


def make_text_messages(ex: dict) -> list[dict]:
    """A text-only policy's prompt: the scene described in words (9), then the question."""
    return [{"role": "system", "content": TEXT_SYSTEM},
            {"role": "user", "content": f"{ex['scene_text']}\n\nQuestion: {ex['question']}"}]


def make_tools() -> dict:
    """The shared crop tool (common.tools.crop) on the question image, in the pixels the
    model sees."""
    def crop_tool(args: dict, r) -> tuple[str, Image.Image | None]:
        out, msg = crop(r.images[0], args.get("bbox_2d"), seen_size(r.images[0]))
        return msg, out
    return {"crop": crop_tool}


PRM_SYSTEM = ("You are a process reward model. "
              "You check one step of a visual reasoning trajectory in which "
              "the solver may zoom into the image with a crop tool.")
PRM_REPLY = {"judge": "Reply with one word: Correct or Incorrect.",
             "prob": "Reply with + if it is correct and - if it is incorrect."}


def prm_messages(rec: dict, k: int, images: list, step_images: dict, mode: str,
                 vlm: bool) -> list[dict]:
    """Question, images, steps 1..k, the facts of step k; asks whether step k is correct.
    The images are the question's and the latest crop made at or before step k (4)."""
    latest = max((i for i in step_images if i <= k), default=None) if vlm else None
    lines = [f"Question: {rec['question']}"]
    for i, s in enumerate(rec["steps"][: k + 1]):
        lines.append(f"Step {i + 1}: {s['text']}")
        if s.get("tool_call") is not None:
            obs = s.get("observation") or "no output"
            lines[-1] += (f"\n  [tool call {json.dumps(s['tool_call'])} -> {obs}]"
                          + (" (its image is the last one shown)" if i == latest else ""))
    if rec["steps"][k].get("knowledge"):
        lines.append("Facts to check it against: " + " ".join(rec["steps"][k]["knowledge"]))
    lines.append(f"\nIs Step {k + 1} correct? Judge Step {k + 1} only: "
                 f"it is correct when what it does or states is right given the question, "
                 f"the images and the steps before it "
                 f"(a step that correctly builds on an earlier mistake is correct). "
                 f"{PRM_REPLY[mode]}")
    pics = list(images) + ([step_images[latest]] if latest is not None else [])
    text = "\n".join(lines)
    user = ([{"type": "image", "image": im} for im in pics] + [{"type": "text", "text": text}]
            if vlm else "(Images not shown: text-only PRM.)\n" + text)
    return [{"role": "system", "content": PRM_SYSTEM}, {"role": "user", "content": user}]


def parse_step_verdict(text) -> float | None:
    """A PRM reply (or a predictions-file value) -> score in [0, 1] or None (unparsed).
    Numbers and booleans are scores; in text, step numbers are dropped first ("Step 1 is correct"
    is not the score 1), an echo of "Correct or Incorrect" is no verdict, a leading "+" / "-" is
    1 / 0, a signed number is a score when in [0, 1] ("-1" is unparsed, not 1), the rest is
    common.judge.parse_verdict."""
    if isinstance(text, (bool, int, float)):
        return float(text) if 0 <= text <= 1 else None
    if not isinstance(text, str):
        return None
    t = re.sub(r"(?i)\bstep\s*#?\d+\b", " ", text).strip().lstrip("*_`'\" ")
    if re.search(r"(?i)\bcorrect\s+or\s+incorrect\b", t):  # the instruction echoed back: no verdict
        return None
    if t[:1] in ("+", "-") and not t[1:2].isdigit():
        return 1.0 if t[0] == "+" else 0.0
    signed = re.match(r"[+-]\d+(?:\.\d+)?", t)   # "-1": a number, not a verdict word and a 1
    if signed:
        return float(signed.group()) + 0.0 if 0 <= float(signed.group()) <= 1 else None
    return parse_verdict(t)


# ==== rewards + metrics: PRMBench, VisualProcessBench, ProcessBench, analyses, best-of-N ==========
# pred[j][i] is True / False (judged correct / not) or None (unparsed).
# Undefined ratios (0/0) are None.
def judge(judged: list[list[dict]], threshold: float) -> list[list]:
    """Scores -> judged correct (True) / not (False) / unparsed (None), per record, per step;
    correct when score > threshold (the rule of PRMBench's probability-PRM wrappers, e.g.
    mr_eval/models/qwen_prm.py: a score of exactly 0.5 is judged incorrect)."""
    return [[None if j["score"] is None else j["score"] > threshold for j in js]
            for js in judged]


def ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def f1_score(tp: int, fp: int, fn: int) -> float | None:
    """2TP / (2TP + FP + FN) = PRMBench's 2PR / (P + R); None if the class is in neither
    gold nor pred; 0 when TP = 0 (PRMBench: -1 when also FP, FN > 0) (7)."""
    return ratio(2 * tp, 2 * tp + fp + fn)


def mean_of_both(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 0.5 * a + 0.5 * b


def confusion(pairs: list[tuple[bool, bool]]) -> dict:
    """(gold correct, judged correct) pairs; correct steps are the positive class (PRMBench's
    TP/FP/FN/TN), so f1 is F1(correct) and negative_f1 is F1(incorrect)."""
    return {"tp": sum(g and p for g, p in pairs), "fp": sum(not g and p for g, p in pairs),
            "fn": sum(g and not p for g, p in pairs), "tn": sum(not g and not p for g, p in pairs)}


def step_pairs(records: list[dict], pred: list[list]) -> list[tuple[bool, bool]]:
    """(gold correct, judged correct) of every labelled correct/incorrect step judged True
    or False."""
    return [(s["label"] == "correct", p)
            for r, ps in zip(records, pred) for s, p in zip(r["steps"], ps)
            if s["label"] in ("correct", "incorrect") and p is not None]


def prmscore(pairs: list[tuple[bool, bool]]) -> dict:
    c = confusion(pairs)
    f1, neg = f1_score(c["tp"], c["fp"], c["fn"]), f1_score(c["tn"], c["fn"], c["fp"])
    return {"f1": f1, "negative_f1": neg, "PRMScore": mean_of_both(f1, neg), "n_steps": len(pairs)}


def is_clean(rec: dict) -> bool:
    """A PRMBench record: its class is `correct` (the originals PRMBench's loader builds; a row
    whose error_steps all lie past its last step stays erroneous, as in evaluate_function).
    Any other record: no incorrect step."""
    if rec["category"] == "PRMBench":
        return rec["subcategory"] == "correct"
    return all(s["label"] != "incorrect" for s in rec["steps"])


def error_types(rec: dict) -> set[str]:
    """The error types a sample holds: its incorrect steps' types; a PRMBench sample's is its
    class (its error_steps may all lie past its last step; clean and multi_solutions hold
    none)."""
    if rec["category"] == "PRMBench":
        return set() if rec["subcategory"] in ("correct", "multi_solutions") else {
            rec["subcategory"]}
    return {s["error_type"] for s in rec["steps"] if s["label"] == "incorrect" and s["error_type"]}


def error_type_at(rec: dict, i: int) -> str | None:
    """The error type of error step i (PRMBench: the class, also past the last step)."""
    return rec["subcategory"] if rec["category"] == "PRMBench" else rec["steps"][i]["error_type"]


# PRMBench's three groups of classes (its result notebooks' classification_parallel_dict)
PRMBENCH_GROUPS = {"simplicity": ("redundency", "circular"),
                   "soundness": ("counterfactual", "step_contradiction", "domain_inconsistency",
                                 "confidence"),
                   "sensitivity": ("missing_condition", "deception", "multi_solutions")}


def gold_at(rec: dict, i: int) -> bool | None:
    """Step i's gold: True (correct), False (incorrect), None (neutral or not labelled). Past
    the last step only a PRMBench record has one: its evaluator loops over the scores it gets,
    so a score there counts as an error step where error_steps (1-based) name that position,
    else as a correct step."""
    if i < len(rec["steps"]):
        return {"correct": True, "incorrect": False}.get(rec["steps"][i]["label"])
    return None if "error_steps" not in rec else i + 1 not in rec["error_steps"]


def prmbench_sample(rec: dict, ps: list) -> dict:
    """One valid sample as PRMBench's eval_on_hallucination_step counts it: TP/FP/FN/TN over its
    judged steps (with gold_at), first_error (1 = its first error step judged incorrect, 0 =
    judged correct, None = no error step or not judged) and response_acc (share of the judged
    steps judged correct)."""
    pairs = [(g, p) for i, p in enumerate(ps) if (g := gold_at(rec, i)) is not None]
    errors = ([k - 1 for k in rec["error_steps"]] if "error_steps" in rec
              else [i for i, s in enumerate(rec["steps"]) if s["label"] == "incorrect"])
    first = min(errors, default=None)
    return {**confusion(pairs),
            "first_error": (None if first is None or not 0 <= first < len(ps)
                            else int(not ps[first])),
            "response_acc": ratio(sum(bool(p) for p in ps), len(ps))}


def prmbench_scores(samples: list[dict], f1_only: bool = False) -> dict:
    """PRMBench's numbers from summed counts: precision, recall (its correct_step_acc),
    negative_precision, negative_recall (wrong_step_acc), accuracy (total_step_acc), f1,
    negative_f1, PRMScore (f1 alone for multi_solutions: no error steps), first_error_acc (mean
    over the samples whose first error step was judged), similarity (mean over the samples
    with one)."""
    tp, fp, fn, tn = (sum(s[k] for s in samples) for k in ("tp", "fp", "fn", "tn"))
    f1, neg = f1_score(tp, fp, fn), f1_score(tn, fn, fp)
    firsts = [s["first_error"] for s in samples if s["first_error"] is not None]
    sims = [s["similarity"] for s in samples if s.get("similarity") is not None]
    return {"PRMScore": f1 if f1_only else mean_of_both(f1, neg), "f1": f1, "negative_f1": neg,
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "negative_precision": ratio(tn, tn + fn), "negative_recall": ratio(tn, tn + fp),
            "accuracy": ratio(tp + tn, tp + fp + fn + tn),
            "first_error_acc": ratio(sum(firsts), len(firsts)),
            "similarity": ratio(sum(sims), len(sims)), "n_samples": len(samples),
            "n_steps": tp + fp + fn + tn}


def prmbench(records: list[dict], pred: list[list]) -> dict:
    """PRMBench's evaluate_function: the erroneous samples' steps pooled (clean ones out), each
    class apart, the clean samples as their own class, and the notebooks' group means of the
    class PRMScores. similarity = |response_acc - that of the sample's clean twin|; PRMBench
    skips a twin whose response_acc is 0 (its `if correct_item_acc`), so does this."""
    valid = [(r, p) for r, p in zip(records, pred) if None not in p]  # PRMBench's `validity`
    samples = {id(r): prmbench_sample(r, p) for r, p in valid}
    twin_acc = {r["id"]: samples[id(r)]["response_acc"] for r, _ in valid if is_clean(r)}
    for r, _ in valid:
        s, twin = samples[id(r)], twin_acc.get(r.get("clean_id"))
        if not is_clean(r) and twin and s["response_acc"] is not None:
            s["similarity"] = abs(s["response_acc"] - twin)
    classes = {"correct" if is_clean(r) else r["subcategory"]: [] for r in records}
    for r, _ in valid:
        classes["correct" if is_clean(r) else r["subcategory"]].append(samples[id(r)])
    erroneous = [samples[id(r)] for r, _ in valid if not is_clean(r)]
    res = {**prmbench_scores(erroneous),
           "validity_rate": ratio(len(erroneous), sum(not is_clean(r) for r in records)),
           "unparsed": "a sample with an unparsed step is invalid and left out "
                       "(PRMBench's validity)"}
    res["per_class"] = {k: prmbench_scores(v, f1_only=k == "multi_solutions")
                        for k, v in sorted(classes.items())}
    res["clean"] = res["per_class"].pop("correct", None)
    res["groups"] = {g: (None if any(res["per_class"].get(c, {}).get("PRMScore") is None
                                     for c in cs)
                         else sum(res["per_class"][c]["PRMScore"] for c in cs) / len(cs))
                     for g, cs in PRMBENCH_GROUPS.items()}
    return res


VPB_METRIC = "macro_f1 as VisualPRM's paper describes; official evaluator not found"


def visualprocessbench(records: list[dict], pred: list[list]) -> dict:
    """Macro-F1 = mean of F1(correct) and F1(incorrect) over the steps, neutral (0), unparsed
    and unscored steps dropped: pooled over every sample (clean ones too) and per data_source
    (the record's subcategory), as VisualPRM's paper reports it. Ours: no official evaluator
    was found, and the paper does not say how its overall number is formed (this one pools)."""
    def macro(rs: list[dict], ps: list[list]) -> dict:
        s = prmscore(step_pairs(rs, ps))
        return {"macro_f1": s["PRMScore"], "f1_correct": s["f1"], "f1_incorrect": s["negative_f1"],
                "n_steps": s["n_steps"]}
    sources = {}
    for r, p in zip(records, pred):
        sources.setdefault(r["subcategory"], ([], []))
        sources[r["subcategory"]][0].append(r)
        sources[r["subcategory"]][1].append(p)
    return {**macro(records, pred), "metric": VPB_METRIC,
            "per_data_source": {k: macro(*v) for k, v in sorted(sources.items())},
            "unparsed": "an unparsed step is dropped, like a neutral one"}


def gold_first_error(rec: dict) -> int:
    """ProcessBench's label: the first incorrect step, -1 when there is none."""
    return next((i for i, s in enumerate(rec["steps"]) if s["label"] == "incorrect"), -1)


def first_error_prediction(ps: list, n_steps: int) -> int | None:
    """ProcessBench's prediction: the first step judged incorrect, -1 when every step is judged
    correct; None (unparsable: never equal to the label, like run_eval.py's unreadable answer)
    when an unparsed or unscored step comes first."""
    for i in range(n_steps):
        p = ps[i] if i < len(ps) else None
        if p is not True:
            return i if p is False else None
    return -1


def processbench(gold_first: list[int], pred_first: list[int | None]) -> dict:
    """acc_err over samples with an error, acc_corr over error-free ones, F1 = their harmonic
    mean (null when both are 0: run_eval.py's numpy gives nan)."""
    err = [p == g for g, p in zip(gold_first, pred_first) if g != -1]
    corr = [p == -1 for g, p in zip(gold_first, pred_first) if g == -1]
    acc_err, acc_corr = ratio(sum(err), len(err)), ratio(sum(corr), len(corr))
    f1 = (None if acc_err is None or acc_corr is None or acc_err + acc_corr == 0   # official: nan
          else 2 * acc_err * acc_corr / (acc_err + acc_corr))
    return {"acc_err": acc_err, "acc_corr": acc_corr, "f1": f1, "n_err": len(err),
            "n_corr": len(corr),
            "unparsed": "an unparsed or unscored step before the first step judged incorrect "
                        "makes the prediction unparsable, never equal to the label "
                        "(run_eval.py's unreadable answer)"}


def step_stats(pairs: list[tuple[bool, bool]]) -> dict:
    """Accuracy, detection rate (incorrect steps judged incorrect) with its Wilson 95 % interval,
    balanced accuracy (mean of the recall on correct steps and the detection rate: independent of
    the label mix), and the share of the steps called correct with its interval."""
    c = confusion(pairs)
    detection, kept = ratio(c["tn"], c["tn"] + c["fp"]), ratio(c["tp"], c["tp"] + c["fn"])
    return {"n_steps": len(pairs), "n_incorrect": c["tn"] + c["fp"],
            "accuracy": ratio(c["tp"] + c["tn"], len(pairs)), "detection_rate": detection,
            "detection_rate_ci95": wilson(c["tn"], c["tn"] + c["fp"]),
            "balanced_accuracy": mean_of_both(detection, kept),
            "share_called_correct": ratio(c["tp"] + c["fp"], len(pairs)),
            "share_called_correct_ci95": wilson(c["tp"] + c["fp"], len(pairs))}


def positive_bias(pairs: list[tuple[bool, bool]]) -> dict:
    """The paper's "positive evaluation bias" (PRMs call bad steps good): the share of the steps
    called correct, overall, on the erroneous steps (= P(judged correct | step wrong)) and on the
    correct ones, each with its Wilson 95 % interval (steps taken as independent draws), next to
    the gold share of correct steps (what a PRM without bias calls correct overall)."""
    c = confusion(pairs)
    n_wrong, n_right = c["fp"] + c["tn"], c["tp"] + c["fn"]
    return {"p_judged_correct_given_wrong": ratio(c["fp"], n_wrong),
            "p_judged_correct_given_right": ratio(c["tp"], n_right),
            "share_called_correct": ratio(c["tp"] + c["fp"], len(pairs)),
            "share_called_correct_ci95": wilson(c["tp"] + c["fp"], len(pairs)),
            "share_called_correct_on_erroneous": ratio(c["fp"], n_wrong),
            "share_called_correct_on_erroneous_ci95": wilson(c["fp"], n_wrong),
            "share_called_correct_on_correct": ratio(c["tp"], n_right),
            "share_called_correct_on_correct_ci95": wilson(c["tp"], n_right),
            "gold_share_correct": ratio(n_right, len(pairs)),
            "n_steps": len(pairs), "n_erroneous": n_wrong}


def position_bucket(i: int, n: int, n_buckets: int) -> int:
    """Relative position i / (n - 1) in [0, 1] (0 for a one-step trajectory) -> bucket index."""
    return min(int((i / (n - 1) if n > 1 else 0.0) * n_buckets), n_buckets - 1)


N_BOOT = 1000  # bootstrap resamples of the trajectories for the contrasts' intervals


def contrasts(records: list[dict], pred: list[list], n_buckets: int, seed: int = 0) -> dict:
    """Two differences fixed before any run (docs/prm_bench.md, "Evidence on real weights"), each
    with a 95 % percentile bootstrap interval over trajectories (a trajectory's steps are drawn
    together: they are not independent draws). discrimination = P(judged correct | step right) -
    P(judged correct | step wrong): 0 for any constant PRM, > 0 when the PRM tells right from
    wrong steps. position_contrast = detection rate in the last position bin - that in the first:
    0 for any constant PRM; position sensitivity when its interval excludes 0. A resample where a
    rate is 0/0 gives no draw for it (n_draws says how many did)."""
    keys = ("right", "cc_right", "wrong", "cc_wrong", "first", "det_first", "last", "det_last")
    counts = np.zeros((len(records), len(keys)))                               # (R, 8)
    for j, (r, ps) in enumerate(zip(records, pred)):
        for i, (s, p) in enumerate(zip(r["steps"], ps)):
            if s["label"] not in ("correct", "incorrect") or p is None:
                continue
            right = s["label"] == "correct"
            counts[j, keys.index("right" if right else "wrong")] += 1
            counts[j, keys.index("cc_right" if right else "cc_wrong")] += p
            b = position_bucket(i, len(r["steps"]), n_buckets)
            if not right and b in (0, n_buckets - 1):
                at = "first" if b == 0 else "last"
                counts[j, keys.index(at)] += 1
                counts[j, keys.index("det_" + at)] += not p

    def stat(idx: list[tuple[int, int]]) -> dict:
        t = dict(zip(keys, counts[[i for _, i in idx]].sum(axis=0)))
        a, b = ratio(t["cc_right"], t["right"]), ratio(t["cc_wrong"], t["wrong"])
        first, last = ratio(t["det_first"], t["first"]), ratio(t["det_last"], t["last"])
        return {"discrimination": None if a is None or b is None else a - b,
                "position_contrast": None if first is None or last is None else last - first}
    names = ("discrimination", "position_contrast")
    point = stat([(0, j) for j in range(len(records))])
    groups = list(range(len(records)))
    draws = {k: [] for k in names}

    def counted(idx: list[tuple[int, int]]) -> dict:   # stat, remembering which draws were 0/0
        m = stat(idx)
        for k in names:
            draws[k].append(m[k])
        return m
    ci = bootstrap_ci(groups, counted, names, N_BOOT, seed)
    return {**{k: point[k] for k in names},
            **{f"{k}_ci95": ci.get(f"{k}_ci95") for k in names},
            **{f"{k}_n_draws": sum(v is not None for v in draws[k]) for k in names},
            "n_boot": N_BOOT, "resampled": "trajectories"}


def evaluate(records: list[dict], pred: list[list], n_buckets: int = 4,
             reference: bool = True) -> dict:
    """Every metric and analysis for the judgements `pred` (per record, per step); with
    `reference`, the same numbers of a constant PRM that calls every judged step correct, on the
    same steps (`constant_prm`: the reference row; no model needed)."""
    pairs = step_pairs(records, pred)
    gold_first = [gold_first_error(r) for r in records]
    pred_first = [first_error_prediction(ps, len(r["steps"]))
                  for r, ps in zip(records, pred)]
    res = {"PRMBench": prmbench(records, pred),
           "VisualProcessBench": visualprocessbench(records, pred),
           "ProcessBench": processbench(gold_first, pred_first),
           "positive_bias": positive_bias(pairs), "steps": step_stats(pairs),
           "n_trajectories": len(records), "n_unparsed": sum(p is None for ps in pred for p in ps),
           "n_unscored": sum(max(0, len(r["steps"]) - len(ps)) for r, ps in zip(records, pred))}
    # the valid samples holding a type (PRMBench's validity, as per_class): PRMBench's counts
    # over their steps; the detection rate counts only the error steps of that type
    res["per_error_type"] = {}
    valid = [j for j, ps in enumerate(pred) if None not in ps]
    for t in sorted({t for r in records for t in error_types(r)}):
        idx = [j for j in valid if t in error_types(records[j])]
        hits = [p for j in idx for i, p in enumerate(pred[j])
                if gold_at(records[j], i) is False and error_type_at(records[j], i) == t]
        s = prmbench_scores([prmbench_sample(records[j], pred[j]) for j in idx])
        res["per_error_type"][t] = {**{k: s[k] for k in ("f1", "negative_f1", "PRMScore",
                                                         "n_steps")},
                                    "detection_rate": ratio(sum(not p for p in hits), len(hits)),
                                    "n_trajectories": len(idx)}
    names = [f"{b / n_buckets:.2f}-{(b + 1) / n_buckets:.2f}" for b in range(n_buckets)]
    buckets, cats = {b: [] for b in names}, {}
    for r, ps in zip(records, pred):
        for i, (s, p) in enumerate(zip(r["steps"], ps)):
            one = step_pairs([{"steps": [s]}], [[p]])
            buckets[names[position_bucket(i, len(r["steps"]), n_buckets)]] += one
            cats.setdefault(r["category"], []).extend(one)
    # by position, next to a constant PRM that calls every step correct on the same steps
    # (label mix)
    res["by_position"] = {b: {**step_stats(v),
                              "constant_prm": step_stats([(g, True) for g, _ in v])}
                          for b, v in buckets.items()}
    res["per_category"] = {c: step_stats(v) for c, v in sorted(cats.items())}
    res["contrasts"] = contrasts(records, pred, n_buckets)
    if reference:
        const = evaluate(records, [[None if p is None else True for p in ps] for ps in pred],
                         n_buckets, reference=False)
        res["constant_prm"] = {
            "what": "a PRM that calls every step the PRM judged correct (its unparsed and "
                    "unscored steps stay so): the reference row",
            "PRMScore": const["PRMBench"]["PRMScore"],
            "VisualProcessBench_macro_f1": const["VisualProcessBench"]["macro_f1"],
            "ProcessBench": {k: const["ProcessBench"][k] for k in ("acc_err", "acc_corr", "f1")},
            "positive_bias": const["positive_bias"], "contrasts": const["contrasts"],
            "detection_by_position": {b: v["detection_rate"]
                                      for b, v in const["by_position"].items()}}
    return res


def best_of_n(questions: list[list[dict]], ns: list[int], repeats: int, seed: int,
              per_question: dict | None = None) -> dict:
    """questions: per question, its candidates {"correct", "answer",
    "scores": [step score | None], optional "gold_scores"}. For each N, `repeats` random N-subsets
    per question, the SAME subset for every method: PRM min / mean (unparsed = 0; ties at random),
    the oracle PRM (gold step labels), majority vote (no answer = no vote), random (its expected
    accuracy) and pass@N. `per_question`, when given, receives each question's accuracy:
    {method: {N: [per question]}} (for intervals over questions)."""
    rng = random.Random(seed)
    oracle = all("gold_scores" in c for q in questions for c in q)
    selectors = [("prm_min", "scores", min), ("prm_mean", "scores", lambda s: sum(s) / len(s)),
                 ("oracle_prm_min", "gold_scores", min)][: 2 + oracle]
    acc = {m: {} for m in [s[0] for s in selectors] + ["majority_vote", "random", "pass@N"]}
    for n in ns:
        tot = dict.fromkeys(acc, 0.0)
        for cands in questions:
            before = dict(tot)
            if n > len(cands):
                raise UserError(f"best-of-{n} needs {n} candidates per question; got {len(cands)}.")
            for _ in range(repeats):
                sub = rng.sample(cands, n)
                for m, key, agg in selectors:
                    vals = [agg([x or 0.0 for x in c[key]]) for c in sub]
                    tot[m] += rng.choice([c for c, v in zip(sub, vals)
                                          if v == max(vals)])["correct"]
                votes = Counter(normalize_answer(c["answer"]) for c in sub
                                if c["answer"] is not None)
                votes.pop("", None)
                if votes:
                    top = rng.choice(sorted(a for a, v in votes.items()
                                            if v == max(votes.values())))
                    voted = next(c for c in sub if normalize_answer(c["answer"] or "") == top)
                    tot["majority_vote"] += voted["correct"]
                tot["random"] += sum(c["correct"] for c in sub) / n
                tot["pass@N"] += any(c["correct"] for c in sub)
            if per_question is not None:
                for m in acc:
                    per_question.setdefault(m, {}).setdefault(n, []).append(
                        (tot[m] - before[m]) / repeats)
        for m in acc:
            acc[m][n] = tot[m] / (repeats * len(questions))
    return acc


# ==== stages ======================================================================================
@functools.cache
def load_model(model: str, adapter: str | None, options: tuple):
    return load_policy(model, **dict(options), lora=False, adapter=adapter)


def get_policy(args: Args, prm: bool):
    """The model (with --prm_adapter when it acts as the PRM), loaded once per process."""
    options = tuple(sorted(run_options(args).items()))
    policy = load_model(args.model, args.prm_adapter if prm else None, options)
    if prm and not policy.is_vlm:
        print(f"[prm_bench] {policy.name} is text-only: the PRM judges steps without the images.")
    return policy


def prm_steps_of(trajectory: list[dict]) -> tuple[list[dict], dict]:
    """A rollout's turns (common.rollout) -> (unlabelled steps, {step index: tool image}):
    each assistant turn is a step; its tool call, observation and image attach to it (reprompts
    do not)."""
    steps, crops = [], {}
    for turn in trajectory:
        if turn["role"] == "assistant":
            steps.append(prm_step(turn["text"].strip() or "(empty step)", None))
        elif steps and turn["name"] not in ("reprompt", "user"):   # a call, not a nudge
            steps[-1].update(tool_call={"name": turn["name"], "arguments": turn["args"]},
                             observation=turn["observation"])
            if turn.get("image") is not None:
                crops[len(steps) - 1] = turn["image"]
    return steps, crops


def agent_rollouts(policy, specs: list[dict], args: Args, G: int, world: World,
                   generate=None) -> list[dict]:
    """G sampled trajectories per question -> records: each assistant turn is a step; its tool
    call, observation and crop attach to it. A text-only policy gets the scene in words and no
    tool (9); it is asked for the next step until it answers or has had max_turns turns.
    `generate`: tests' scripted sampler."""
    examples = [dict(id=s["id"], image=s["scene"]["image"], question=s["question"], spec=s,
                     scene_text=describe_scene(s, world)) for s in specs]
    if policy.is_vlm:
        view = dict(make_messages=make_messages, tools=make_tools(), reprompt=REPROMPT)
    else:
        print(f"[search] {policy.name} is text-only: it reads the scene described in words "
              f"(no image, no crop tool).")
        view = dict(make_messages=make_text_messages,
                    next_user_turn=lambda r, t: text_nudge(r, t, args.max_turns))
    rollouts = run_rollouts(policy, examples, num_generations=G, grammar=GRAMMAR,
                            max_turns=args.max_turns, max_tool_calls={"crop": 2},
                            max_new_tokens=args.max_completion_length,
                            max_total_tokens=args.max_turns * 400,
                            temperature=args.temperature, generate=generate, **view)
    answers = [r.answer if policy.is_vlm else last_call_answer(r, args.max_turns)
               for r in rollouts]
    return [scene_record(r.example["spec"], f"{r.example['id']}-g{j % G}",
                         *prm_steps_of(r.trajectory), a, f"policy:{policy.name}")
            for j, (r, a) in enumerate(zip(rollouts, answers))]


@torch.no_grad()
def plus_probability(policy, batch: list[list[dict]]) -> list[float]:
    """P("+") / (P("+") + P("-")) of the next token after each prompt (5)."""
    tok = policy.tokenizer
    plus, minus = (tok.encode(s, add_special_tokens=False)[0] for s in ("+", "-"))
    seqs = [encode(tok, policy.image_processor, m, add_generation_prompt=True) for m in batch]
    inputs = collate(seqs, tok.pad_token_id, "left", image_token_id(tok) if policy.is_vlm else None)
    inputs.pop("loss_mask")
    inputs = {k: v.to(policy.device) for k, v in inputs.items()}
    logits = policy.model(**inputs, logits_to_keep=1).logits                             # (B, 1, V)
    return torch.softmax(logits[:, -1, [plus, minus]].float(), dim=-1)[:, 0].tolist()  # (B,)


def score_steps(policy, records: list[dict], args: Args,
                log: RunLog | None = None) -> list[list[dict]]:
    """Every step of every record -> {"score": float | None (unparsed), "reply": str},
    per record. Under torchrun the steps are split by rank and gathered in order
    (common/distributed.py)."""
    items = [(i, k) for i, r in enumerate(records) for k in range(len(r["steps"]))]
    require_same_on_every_rank([[r["id"], [s["text"] for s in r["steps"]]] for r in records],
                               "The trajectories to judge")
    mine = shard(items)
    out, starts = [], range(0, len(mine), args.batch_size)
    for b in (log.bar(starts, desc=f"PRM ({args.prm})") if log else starts):
        chunk = [(records[i], k) for i, k in mine[b: b + args.batch_size]]
        images = {id(r): prm_record_images(r) for r, _ in chunk}   # per batch: real sets are large
        msgs = [prm_messages(r, k, *images[id(r)], args.prm, policy.is_vlm) for r, k in chunk]
        if args.prm == "prob":
            scores = plus_probability(policy, msgs)
            replies = [f"P(+)={p:.3f}" for p in scores]
        else:
            replies = policy.chat(msgs, max_new_tokens=args.judge_max_new_tokens, temperature=0.0)
            scores = [parse_step_verdict(x) for x in replies]
        out += [{"score": sc, "reply": rep} for sc, rep in zip(scores, replies)]
        if log:
            log.log({"unparsed": sum(s is None for s in scores) / len(scores)},
                    step=b // args.batch_size)
    judged = iter(gather_in_order(out))       # every rank's steps, in the items' order
    return [[next(judged) for _ in r["steps"]] for r in records]


def stage_data(args: Args) -> dict:
    out = Path(args.out) / "data"
    log, world = RunLog(str(out)), build_world(args.seed, args.n_scenes, args.image_size)
    records = build_toy_set(world, args.seed, args.p_clean, args.p_multi, args.p_recover)
    at = Counter(position_bucket(i, len(r["steps"]), N_BUCKETS)   # where the errors sit
                 for r in records for i, s in enumerate(r["steps"]) if s["label"] == "incorrect")
    write_set(records, out, "toy", "toy trajectories (gold labels)")
    summary = {"toy_trajectories": len(records), "toy_steps": sum(len(r["steps"]) for r in records),
               "clean": sum(not r["injected"] for r in records),
               "two_errors": sum(len(r["injected"]) > 1 for r in records),
               "recovered": sum(bool(r["injected"] and exact_match(r["final_answer"], r["answers"]))
                                for r in records),
               "error_types": dict(Counter(x["error_type"]
                                           for r in records for x in r["injected"])),
               "errors_by_position": {f"bucket{b}": at[b] for b in range(N_BUCKETS)}}
    log.log({k: v for k, v in summary.items() if isinstance(v, int)}, step=0)
    log.summary(summary)
    print(f"[data] {summary} -> {out}")
    return summary


def plot_rates(groups: dict[str, dict], path: Path, title: str, xlabel: str,
               why_empty: str) -> None:
    """Grouped bars (an undefined value, 0/0, is written n/a); a plot without any value says why
    it is empty."""
    bar_plot(groups, str(path), title, "rate (0-1)", xlabel, why_empty, 1.0)


def eval_results(args: Args, records: list[dict], judged: list[list[dict]], who: str) -> dict:
    """eval/results.json: every metric of the judgements on the records, and what was run."""
    return {**evaluate(records, judge(judged, args.threshold), N_BUCKETS), "prm": who,
            "adapter": args.prm_adapter, "data": args.data or "toy", "benchmark": args.benchmark,
            "threshold": args.threshold,
            "null": "undefined (0/0): PRMBench's code writes -1 there, ProcessBench's numpy nan"}


def stage_eval(args: Args) -> dict:
    out = Path(args.out) / "eval"
    log, records = RunLog(str(out)), load_benchmark(args)
    if args.predictions:
        who = f"predictions {Path(args.predictions).name}"
        judged = read_predictions(args.predictions, records)
    else:
        policy = get_policy(args, prm=True)
        judged, who = score_steps(policy, records, args, log), f"{policy.name} ({args.prm})"
    res = eval_results(args, records, judged, who)
    write_json(str(out / "results.json"), res)
    rates = (f"unparsed {res['n_unparsed']} of {sum(len(j) for j in judged)} steps, left out"
             + (f"; {res['n_unscored']} steps unscored" if res["n_unscored"] else ""))
    by_type = {m: {t: v[m] for t, v in res["per_error_type"].items()}
               for m in ("detection_rate", "PRMScore")}
    plot_rates(by_type, out / "per_error_type.png", f"PRM {who} by error type ({rates})",
               "injected error type", "the data has no error types, or no step was judged")
    by_pos = {"accuracy": {b: v["accuracy"] for b, v in res["by_position"].items()},
              "accuracy of a constant PRM (the label mix)":
                  {b: v["constant_prm"]["accuracy"] for b, v in res["by_position"].items()},
              **{m: {b: v[m] for b, v in res["by_position"].items()}
                 for m in ("balanced_accuracy", "detection_rate")}}
    plot_rates(by_pos, out / "by_position.png", f"PRM {who} by relative step position",
               "where the step sits in its trajectory (bucket of the relative position)",
               "no judged step")
    log.samples([{"id": r["id"], "step": i, "label": s["label"], "error_type": s["error_type"], **j}
                 for r, js in zip(records, judged) for i, (s, j) in enumerate(zip(r["steps"], js))])
    trajectory_html(prm_html_items(records[:12], judged), str(out / "judged.html"),
                    "PRM judgements")
    log.summary({k: res[k] for k in ("PRMBench", "VisualProcessBench", "ProcessBench",
                                     "positive_bias", "n_unparsed")})
    print(f"[eval] PRMScore {res['PRMBench']['PRMScore']} "
          f"| VisualProcessBench macro-F1 {res['VisualProcessBench']['macro_f1']} "
          f"| ProcessBench F1 {res['ProcessBench']['f1']} | {rates} -> {out / 'results.json'}")
    print(evidence_lines(res))
    return res


def rate_ci(value: float | None, ci: list[float] | None = None) -> str:
    """0.83 [0.75, 0.89]; n/a for an undefined rate."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def evidence_lines(res: dict) -> str:
    """The console's view of the evidence (docs/prm_bench.md, "Evidence on real weights"): the
    share of steps called correct overall and on the erroneous steps, the detection rate by
    position, and the two contrasts, each with its 95 % interval, beside the constant PRM."""
    b, c, k = res["positive_bias"], res["constant_prm"], res["contrasts"]
    cb, ck = c["positive_bias"], c["contrasts"]
    called = rate_ci(b["share_called_correct"], b["share_called_correct_ci95"])
    on_wrong = rate_ci(b["share_called_correct_on_erroneous"],
                       b["share_called_correct_on_erroneous_ci95"])
    const = (f"{rate_ci(cb['share_called_correct'])} / "
             f"{rate_ci(cb['share_called_correct_on_erroneous'])}")
    pos = " | ".join(f"{name} {rate_ci(v['detection_rate'], v['detection_rate_ci95'])} "
                     f"of {v['n_incorrect']}" for name, v in res["by_position"].items())
    const_pos = " / ".join(rate_ci(v) for v in c["detection_by_position"].values())
    disc = rate_ci(k["discrimination"], k["discrimination_ci95"])
    contrast = rate_ci(k["position_contrast"], k["position_contrast_ci95"])
    return "\n".join([
        f"[eval] called correct: {called} of {b['n_steps']} steps (gold share correct "
        f"{rate_ci(b['gold_share_correct'])}); on the {b['n_erroneous']} erroneous steps "
        f"{on_wrong} | constant PRM {const}",
        f"[eval] detection rate by relative position: {pos} | constant PRM {const_pos}",
        f"[eval] discrimination P(called correct | right step) - P(... | wrong step) {disc}; "
        f"position contrast (detection, last - first bin) {contrast} | constant PRM "
        f"{rate_ci(ck['discrimination'])} / {rate_ci(ck['position_contrast'])}"])


def plot_best_of_n(res: dict, ns: list[int], path: Path) -> None:
    """search/results.json as accuracy-vs-N curves, one per selection method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.8))
    source = "SIMULATED (toy)" if res["source"] == "toy" else "policy"
    methods = list(res["accuracy"].items())
    for i, (m, v) in enumerate(methods):   # a small sideways shift keeps equal curves visible
        shift = 2 ** (0.04 * (i - (len(methods) - 1) / 2))
        ax.plot([n * shift for n in ns], [v[n] for n in ns], marker="o",
                ls="--" if m == "pass@N" else "-", label=m)
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set(xticks=ns, xticklabels=[str(n) for n in ns],
           xlabel="N (candidates shared by every method)", ylabel="accuracy", ylim=(-0.02, 1.02),
           title=f"best-of-N, {source} candidates, PRM {res['prm']}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout(rect=(0, 0.1, 1, 1))   # the note goes below the axes, never over the data
    fig.text(0.01, 0.01, "pass@N = an oracle that knows the answer (the ceiling). "
             "The oracle PRM (gold step labels)\n"
             "meets it when every error-free candidate is right and every other wrong; "
             "a recovered error\n"
             "(right answer despite a wrong step) puts it below.", fontsize=7, va="bottom")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_search(args: Args) -> dict:
    out = Path(args.out) / "search"
    log, ns = RunLog(str(out)), search_ns(args)
    world = build_world(args.seed, args.n_scenes, args.image_size)
    specs, M = toy_questions(world, random.Random(args.seed + 1))[: args.search_questions], ns[-1]
    # simulated candidates: the toy generator with its injected errors
    if args.search_source == "toy":
        print("[search] the candidates are SIMULATED (toy trajectories with injected errors), "
              "not sampled.")
        cands = build_toy_set(world, args.seed + 1, args.p_clean, args.p_multi, args.p_recover,
                              specs, copies=M)
    else:
        policy = get_policy(args, prm=False)     # questions split by rank under torchrun
        cands = run_sharded(lambda part: agent_rollouts(policy, part, args, M, world), specs)
    write_set(cands, out, "candidates", f"best-of-N candidates ({args.search_source})",
              require_labels=False)
    judged = score_steps(get_policy(args, prm=True), cands, args)
    groups = [[] for _ in specs]  # cands are question-major: M per question
    for j, (rec, js) in enumerate(zip(cands, judged)):
        groups[j // M].append({"correct": bool(exact_match(rec["final_answer"], rec["answers"])),
                               "answer": rec["final_answer"], "scores": [x["score"] for x in js]})
        if args.search_source == "toy":  # gold step labels: the oracle PRM
            groups[j // M][-1]["gold_scores"] = [float(s["label"] != "incorrect")
                                                 for s in rec["steps"]]
    per_question: dict = {}
    res = {"accuracy": best_of_n(groups, ns, args.search_repeats, args.seed, per_question),
           "source": args.search_source, "questions": len(groups), "candidates_per_question": M,
           "prm": args.prm,
           "candidate_accuracy": ratio(sum(c["correct"] for g in groups for c in g), len(cands)),
           **differing(groups), **search_intervals(per_question, ns, args.seed)}
    for n in ns:
        log.log({m: v[n] for m, v in res["accuracy"].items()}, step=n)
    write_json(str(out / "results.json"), res)
    plot_best_of_n(res, ns, out / "best_of_n.png")
    log.summary(res)
    curves = " | ".join(f"{m} " + " ".join(f"{v[n]:.2f}" for n in ns)
                        for m, v in res["accuracy"].items())
    print(f"[search] {curves}  (N = {ns}) -> {out / 'results.json'}")
    gain = res["prm_min_minus_random"][ns[-1]]
    print(f"[search] {res['groups_with_differing_answers']} of {len(groups)} questions have "
          f"candidates with differing answers, {res['groups_with_mixed_correctness']} a right and "
          f"a wrong one (only these can separate the methods); best-of-{ns[-1]} PRM min - random "
          f"{rate_ci(gain['value'], gain['ci95'])} (bootstrap over questions)")
    return res


def differing(groups: list[list[dict]]) -> dict:
    """How many questions' candidates differ: in their final answers (normalised; no answer is
    an answer of its own), and in correctness (a right and a wrong one): selection can change
    the accuracy only on the latter."""
    answers = [{normalize_answer(c["answer"]) if c["answer"] is not None else None for c in g}
               for g in groups]
    return {"groups_with_differing_answers": sum(len(a) > 1 for a in answers),
            "groups_with_mixed_correctness": sum(len({c["correct"] for c in g}) > 1
                                                 for g in groups)}


def search_intervals(per_question: dict, ns: list[int], seed: int) -> dict:
    """95 % percentile bootstrap intervals over questions: each method's accuracy per N
    (accuracy_ci95) and the difference PRM min - random (the effect fixed before the runs:
    docs/prm_bench.md, "Evidence on real weights")."""
    n_q = len(per_question["random"][ns[0]])
    cis, gain = {m: {} for m in per_question}, {}
    for n in ns:
        diff = [a - b for a, b in zip(per_question["prm_min"][n], per_question["random"][n])]
        keys = list(per_question) + ["gain"]

        def stat(idx: list[tuple[int, int]]) -> dict:
            vals = {m: per_question[m][n] for m in per_question} | {"gain": diff}
            return {k: sum(vals[k][i] for _, i in idx) / len(idx) for k in keys}
        ci = bootstrap_ci(list(range(n_q)), stat, keys, N_BOOT, seed)
        for m in per_question:
            cis[m][n] = ci.get(f"{m}_ci95")
        gain[n] = {"value": sum(diff) / n_q, "ci95": ci.get("gain_ci95")}
    return {"accuracy_ci95": cis, "prm_min_minus_random": gain,
            "intervals": f"95 % percentile bootstrap over the {n_q} questions ({N_BOOT} draws)"}


def search_ns(args: Args) -> list[int]:
    ns = sorted({int(x) for x in args.search_n.split(",") if x.strip().isdigit()})
    if not ns or ns[0] < 1 or len(ns) != len([x for x in args.search_n.split(",") if x.strip()]):
        raise UserError(f"--search_n must list positive integers such as 1,2,4,8; "
                        f"got {args.search_n!r}.")
    return ns


# ==== main ========================================================================================
def check_inputs(args: Args) -> None:
    """Every user file and list, before any model is loaded."""
    check_values(args, {
        "threshold": (lambda v: 0 <= v <= 1, "in [0, 1] (a probability of 'correct')"),
        "image_size": (lambda v: v >= 56, ">= 56 (the toy scenes need two 28-pixel patches)"),
        **{k: (lambda v: 0 <= v <= 1, "in [0, 1]") for k in ("p_clean", "p_multi", "p_recover")},
        **{k: (lambda v: v >= 0, ">= 0") for k in ("max_steps", "temperature")},
        **{k: (lambda v: v >= 1, ">= 1") for k in ("judge_max_new_tokens", "batch_size",
                                                    "search_questions", "search_repeats",
                                                    "max_turns", "max_completion_length")}})
    if args.n_scenes < 2:   # gog.py's world keeps its test entities in a scene of their own
        raise UserError(f"--n_scenes must be at least 2 "
                        f"(gog.py's toy world needs a training and a test scene), "
                        f"not {args.n_scenes}.")
    if args.stage in ("search", "all"):
        search_ns(args)
    if args.stage == "eval" or (args.data and args.stage == "all"):
        records = load_benchmark(args)
        if args.predictions:
            read_predictions(args.predictions, records)
    elif args.predictions:
        raise UserError("--predictions scores the records of --stage eval; "
                        "pass --stage eval and --data.")


def main(argv=None):
    stages = {"data": stage_data, "eval": stage_eval, "search": stage_search}
    return run_stages(Args, stages, argv, doc=__doc__, file=__file__, tiny=TINY_SIZES,
                      check=check_inputs)


if __name__ == "__main__":
    main()
