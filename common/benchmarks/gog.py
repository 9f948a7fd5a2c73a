"""gog.py's published formats: visual search QA files (FVQA, InfoSeek, MMSearch, SimpleVQA,
LiveVQA, DynVQA) -> records, and their official scorers.
"""
from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import RunArgs
from common.errors import UserError
from common.data import open_image, read_records, require
from common.judge import exact_match, llm_judge_batch, normalize_answer, sub_exact_match
from common.tools import ImageSearch, TextSearch


# =============================================================================================
# gog.py: visual search QA (FVQA, InfoSeek, MMSearch, SimpleVQA, LiveVQA, DynVQA)
# gog.py's BENCHMARKS table names each file's fields and its scoring rule (score_record).
# =============================================================================================


@dataclass
class VisualQAArgs(RunArgs):
    """The fields that name gog.py's benchmark files and their search corpora (`class Args(..., VisualQAArgs)`)."""
    # --- benchmarks ---
    benchmarks: str = ""
    """NAME=FILE,... in the published formats: FVQA, InfoSeek, MMSearch, SimpleVQA, LiveVQA, DynVQA"""
    image_dir: str | None = None
    """folder of benchmark images named <id>.<ext> or by URL file name (InfoSeek ids, DynVQA/LiveVQA URLs)"""
    predictions: str | None = None
    """score this file of {"id", "answer"} (another model's answers) instead of running the policy"""
    text_corpus: str | None = None
    """JSONL corpus for text search on benchmarks (default: the toy text KB, or TEXT_SEARCH_ENDPOINT)"""
    image_kb: str | None = None
    """JSONL image KB for image search on benchmarks (default: the toy image KB, or IMAGE_SEARCH_ENDPOINT)"""


def field_at(row: dict, path: str):
    """`a.b` reads a nested field; None when any step is missing."""
    for key in path.split("."):
        row = row.get(key) if isinstance(row, dict) else None
    return row


def as_list(v) -> list:
    """Golds as a list: a list, a JSON-encoded list (FVQA's candidate_answers), a string, or nothing."""
    if isinstance(v, str) and v.strip().startswith("["):
        try:
            v = json.loads(v)
        except ValueError:
            pass
    return [] if v is None or v == "" else list(v) if isinstance(v, (list, tuple)) else [v]


def question_text(v, where: str) -> str:
    """FVQA's prompt is a chat list: its last user message; other benchmarks hold a string."""
    if isinstance(v, (list, tuple)):
        users = [m.get("content") for m in v if isinstance(m, dict) and m.get("role") == "user"]
        v = users[-1] if users else None
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"{where}: the question field is empty or not text.")
    return v.replace("<image>", "").strip()


def resolve_image(v, name: str, where: str, base: Path, image_dir: str | None, is_id: bool = False):
    """Embedded bytes (or base64), a path inside the data folder, an id (is_id: InfoSeek's OVEN ids)
    or a URL: the last two name a file in `image_dir` (`<id>.<ext>` or the URL's file name)."""
    v = (v or [None])[0] if isinstance(v, list) else v
    if isinstance(v, str) and len(v) > 1024:  # a base64-encoded image (SimpleVQA JSON), not a path
        v = base64.b64decode(v)
    if v is None or not (isinstance(v, str) and (v.startswith(("http://", "https://")) or is_id)):
        return None if v is None else open_image(v, base, where)
    key = v.rsplit("/", 1)[-1].split("?")[0] if "://" in v else v
    if not image_dir:
        raise UserError(f"{where}: {name} image {v[:80]!r} is remote or an id; download the images into a "
                        f"folder and pass --image_dir.")
    found = [p for p in (Path(image_dir) / key, *Path(image_dir).glob(key + ".*")) if p.is_file()]
    if not found:
        raise UserError(f"{where}: no file for image {key!r} in --image_dir {image_dir}.")
    return open_image(found[0].name, image_dir, where)


def split_items(rows: list[tuple[str, dict]], keys: list[str]) -> list[tuple[str, dict]]:
    """LiveVQA items hold several questions (level1_qa, level2_qa) on one image: one record each,
    id `<id>-<key>`, options appended to the question."""
    out = []
    for where, r in rows:
        for key in keys:
            qa = r.get(key)
            if isinstance(qa, dict):
                opts = " ".join(str(o) for o in qa.get("options") or [])
                question = f"{qa.get('question', '')} {opts}".strip()
                item = dict(qa, id=f"{r.get('id')}-{key}", img_path=r.get("img_path"), level=key)
                out.append((f"{where} {key}", dict(item, question=question)))
    return out


def read_visual_qa(name: str, path: str, spec: dict, image_dir: str | None = None) -> list[dict]:
    """Records of one benchmark file in its published schema, as gog.py's field map `spec` names its
    fields -> {"id", "question", "image", "answers", "golds", "split", "benchmark"}."""
    rows = read_records(path, f"{name} file")
    rows = split_items(rows, spec["items"]) if spec.get("items") else rows
    out = []
    for where, r in rows:
        require(r, where, spec["id"], spec["question"])
        golds = [g for f in spec["golds"] for g in as_list(field_at(r, f))]
        if not golds:
            raise UserError(f"{where}: no gold answer in {', '.join(spec['golds'])}.")
        answers = [str(g.get("wikidata", g.get("range"))) if isinstance(g, dict) else str(g) for g in golds]
        image = resolve_image(field_at(r, spec["image"]), name, where, Path(path).parent, image_dir,
                              spec.get("image_is_id"))
        split = str(field_at(r, spec["split"])) if spec["split"] else "all"
        out.append({"id": str(field_at(r, spec["id"])), "benchmark": name, "kind": name, "golds": golds,
                    "answers": answers, "question": question_text(field_at(r, spec["question"]), where),
                    "split": split, "image": image, "target": None, "target_box": None})
    return out


def parse_benchmarks(spec: str, names) -> list[tuple[str, str]]:
    """--benchmarks NAME=FILE,... -> [(canonical name, file)]; NAME ignores case and dashes."""
    canonical, out = {n.lower().replace("-", ""): n for n in names}, []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        key, _, path = item.partition("=")
        name = canonical.get(key.lower().replace("-", ""))
        if not path or name is None:
            raise UserError(f"--benchmarks takes NAME=FILE with NAME in {', '.join(names)}, not {item!r}.")
        out.append((name, path))
    return out


def read_predictions(path: str) -> dict[str, str]:
    """Another model's answers: {record id: answer} from {"id" | "data_id", "answer" | "prediction"}."""
    out = {}
    for where, r in read_records(path, "predictions file"):
        rid, ans = r.get("id", r.get("data_id")), r.get("answer", r.get("prediction"))
        if rid is None or ans is None:
            raise UserError(f'{where}: a prediction needs "id" (or "data_id") and "answer" '
                            '(or "prediction").')
        out[str(rid)] = str(ans)
    return out


def benchmark_searchers(text_corpus: str | None, image_kb: str | None, fallback: tuple) -> tuple:
    """(text, image) search for real benchmarks: a JSONL corpus, else the HTTP endpoint
    (TEXT_SEARCH_ENDPOINT / IMAGE_SEARCH_ENDPOINT), else the `fallback` engines, announced."""
    ts = ims = None
    if text_corpus or os.environ.get("TEXT_SEARCH_ENDPOINT"):
        ts = TextSearch.from_jsonl(text_corpus) if text_corpus else TextSearch(use_env=True)
    if image_kb or os.environ.get("IMAGE_SEARCH_ENDPOINT"):
        ims = ImageSearch.from_jsonl(image_kb) if image_kb else ImageSearch(use_env=True)
    if ts is None or ims is None:
        print("[eval] benchmarks use the toy KBs for a search without --text_corpus/--image_kb or an endpoint.")
    return ts or fallback[0], ims or fallback[1]


# --- the scoring rules, each as the benchmark's own code computes it ---
def token_f1(pred: str | None, gold: str) -> float:
    """SQuAD token F1 of normalised strings (MMSearch end2end)."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum(min(p.count(t), g.count(t)) for t in set(p) & set(g))
    return 0.0 if common == 0 else 2 * common / (len(p) + len(g))


def numbers_in(text: str) -> float | list[float]:
    """InfoSeek's process_numerical_answer: the first two numbers as a range, one number, or [0, 0]."""
    nums = []
    spaced = re.sub(r"(?<=\d)-", " - ", text)
    for n in re.findall(r"[-+]?[.]?[\d]+(?:,\d\d\d)*[\.]?\d*(?:[eE][-+]?\d+)?", spaced)[:2]:
        n = n.replace(",", "").strip(".")
        nums.append(float(n.split(".")[0] if n.count(".") > 1 else n))
    if len(nums) == 2:
        return nums if nums[0] <= nums[1] else nums[0]
    return nums[0] if nums else [0.0, 0.0]


def infoseek_score(pred: str | None, golds: list) -> float:
    """InfoSeek: numeric golds {"range": [lo, hi]}: a predicted number inside it, or a predicted range
    inside it or with IoU >= 0.5; otherwise exact match to any alias in answer_eval."""
    rng = next((g["range"] for g in golds if isinstance(g, dict) and "range" in g), None)
    if rng is None:
        return exact_match(pred, [str(g) for g in golds])
    lo, hi, p = float(rng[0]), float(rng[1]), numbers_in(pred or "")
    if not isinstance(p, list):
        return float(lo <= p <= hi)
    if lo <= p[0] <= hi and lo <= p[1] <= hi:
        return 1.0
    overlap = max(0.0, min(p[1], hi) - max(p[0], lo))
    return float(overlap / ((p[1] - p[0]) + (hi - lo) + 2e-12 - overlap) >= 0.5 - 1e-12)


def score_record(rule: str, pred: str | None, golds: list, judged: float | None) -> dict:
    """Per-record metrics under the benchmark's rule; `judged` is the LLM judge's verdict (if any)."""
    strings = [str(g) for g in golds]
    if rule == "mmsearch_r1":
        m = {"EM": exact_match(pred, strings), "SubEM": sub_exact_match(pred, strings)}
    elif rule == "infoseek":
        m = {"InfoSeek": infoseek_score(pred, golds)}
    elif rule == "token_f1":
        m = {"F1": max(token_f1(pred, g) for g in strings)}
    elif rule == "llm_judge":
        m = {"SubEM (rule stand-in for the LLM grader)": sub_exact_match(pred, strings)}
    elif rule == "sub_em_ours":
        m = {"SubEM (ours; no official scorer)": sub_exact_match(pred, strings)}
    else:
        raise ValueError(f"unknown scoring rule {rule!r}")
    if judged is not None:
        m["LLM judge"] = judged
    return m


def summarize_benchmark(name: str, records: list[dict], scores: list[dict]) -> dict:
    """Mean of each metric in %; InfoSeek's final score is the harmonic mean of its unseen-question
    and unseen-entity splits (as its evaluator does) when both are present."""
    out = {k: 100 * float(np.mean([s[k] for s in scores])) for k in scores[0]}
    by = {}
    for r, s in zip(records, scores):
        by.setdefault(r["split"], []).append(s[list(s)[0]])
    out["by_split"] = {k: 100 * float(np.mean(v)) for k, v in by.items()}
    if name == "InfoSeek":
        q = [s["InfoSeek"] for r, s in zip(records, scores) if r["split"].endswith("unseen_question")]
        e = [s["InfoSeek"] for r, s in zip(records, scores) if not r["split"].endswith("unseen_question")]
        if q and e:
            a, b = max(100 * np.mean(q), 1e-12), max(100 * np.mean(e), 1e-12)
            out["InfoSeek"] = float(2 / (1 / a + 1 / b))
    out["headline"] = "LLM judge" if "LLM judge" in out else list(scores[0])[0]
    return {**out, "n": len(records)}


def score_benchmark(name: str, rule: str, records: list[dict], answers: list, judged: list) -> dict:
    """Every record under the benchmark's rule -> its summary in %, and how many answers are missing."""
    scores = [score_record(rule, a, r["golds"], j) for a, r, j in zip(answers, records, judged)]
    return {**summarize_benchmark(name, records, scores), "missing_answers": sum(a is None for a in answers)}


def score_benchmarks(benches: list[tuple[str, list[dict]]], answers: dict[str, list], table: dict,
                     judge=None) -> dict[str, dict]:
    """{name: score_benchmark(...)} for each (name, records) under its rule table[name]["score"]; with
    an LLM judge (a loaded policy), its verdict on each answer is scored too."""
    out = {}
    for name, recs in benches:
        judged = (llm_judge_batch(judge, [r["question"] for r in recs], answers[name], [r["answers"] for r in recs])
                  if judge is not None else [None] * len(recs))
        out[name] = score_benchmark(name, table[name]["score"], recs, answers[name], judged)
    return out


