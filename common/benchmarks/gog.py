"""gog.py's published formats, read only: visual search QA files (FVQA, InfoSeek, MMSearch,
SimpleVQA, LiveVQA, DynVQA) -> records, another model's answers, and the official scorers, written
from the official code (not copied): MMSearch-R1's EM / SubEM and answer extraction, InfoSeek's
numeric ranges and final score, MMSearch's token F1. gog.py's BENCHMARKS table names each file's
fields, its scoring rule (score_record) and the source; tests/test_conformance_gog.py checks them
against numbers made by the official code.
"""
from __future__ import annotations

import base64
import json
import re
import string
from collections import Counter
from pathlib import Path

from common.data import open_image, read_records, require, unique_ids
from common.errors import UserError


def field_at(row: dict, path: str):
    """`a.b` reads a nested field; None when any step is missing."""
    for key in path.split("."):
        row = row.get(key) if isinstance(row, dict) else None
    return row


def as_list(v) -> list:
    """Golds as a list: a list, a JSON-encoded list (FVQA's candidate_answers), a string, or
    nothing."""
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
        raise UserError(f"{where}: {name} image {v[:80]!r} is remote or an id; download the images "
                        f"into a "
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


def read_qtypes(path: str, spec: dict) -> dict[str, str] | None:
    """InfoSeek's question types ({data_id: String / Time / Numerical}) from the file its
    evaluator takes beside the reference (`infoseek_val_qtype.jsonl` for `infoseek_val.jsonl`),
    or None when there is none."""
    qtype = Path(path).with_name(spec["qtype"].format(stem=Path(path).stem))
    if not qtype.is_file():
        return None
    rows = read_records(qtype, "question-type file")
    for where, r in rows:
        require(r, where, "data_id", "question_type")
    return {str(r["data_id"]): str(r["question_type"]) for _, r in rows}


def read_visual_qa(name: str, path: str, spec: dict, image_dir: str | None = None,
                   images: bool = True) -> list[dict]:
    """Records of one benchmark file in its published schema, as gog.py's field map `spec` names its
    fields -> {"id", "question", "image", "answers", "golds", "split", "benchmark", ...};
    `images=False` (scoring a predictions file) leaves "image" None and needs no --image_dir."""
    rows = read_records(path, f"{name} file")
    rows = split_items(rows, spec["items"]) if spec.get("items") else rows
    qtypes = read_qtypes(path, spec) if spec.get("qtype") else None
    out = []
    for where, r in rows:
        require(r, where, spec["id"], spec["question"])
        golds = [g for f in spec["golds"] for g in as_list(field_at(r, f))]
        if not golds:
            raise UserError(f"{where}: no gold answer in {', '.join(spec['golds'])}.")
        answers = [str(g.get("wikidata", g.get("range"))) if isinstance(g, dict) else str(g)
                   for g in golds]
        image = (resolve_image(field_at(r, spec["image"]), name, where, Path(path).parent,
                               image_dir, spec.get("image_is_id")) if images else None)
        split = str(field_at(r, spec["split"])) if spec["split"] else "all"
        rid = str(field_at(r, spec["id"]))
        rec = {"id": rid, "benchmark": name, "kind": name, "golds": golds, "answers": answers,
               "question": question_text(field_at(r, spec["question"]), where),
               "split": split, "image": image, "target": None, "target_box": None}
        for key in ("letter", "subfield"):
            if spec.get(key):
                rec[key] = field_at(r, spec[key])
        if qtypes is not None:
            rec["qtype"] = qtypes.get(rid)
            numeric = gold_range(golds) is not None
            if rec["qtype"] is None:
                raise UserError(f"{where}: the question-type file beside {name}'s file has no row "
                                f"for {rid!r}.")
            if (rec["qtype"].lower() == "numerical") != numeric:
                raise UserError(f"{where}: the question-type file says {rec['qtype']!r} for "
                                f"{rid!r}, but its answer_eval {'holds' if numeric else 'lacks'} "
                                f"a numeric range.")
        out.append(rec)
    return out


def read_predictions(path: str) -> dict[str, str]:
    """Another model's answers: {record id: answer} from {"id" | "data_id" | "sample_id",
    "answer" | "prediction"} (MMSearch and InfoSeek write the last two)."""
    out, wheres = {}, []
    for where, r in read_records(path, "predictions file"):
        rid = next((r[k] for k in ("id", "data_id", "sample_id") if r.get(k) is not None), None)
        ans = r.get("answer", r.get("prediction"))
        if rid is None or ans is None:
            raise UserError(f'{where}: a prediction needs "id" (or "data_id", "sample_id") and '
                            '"answer" (or "prediction").')
        out[str(rid)] = str(ans)
        wheres.append((where, rid))
    unique_ids(wheres)   # two answers to one question: which one is scored would be a guess
    return out


# --- the scoring rules, each as the benchmark's own code computes it (written here, not copied) ---
ASCII_PUNCT = frozenset(string.punctuation)


def squad_normalize(s: str | None) -> str:
    """The normalisation shared by MMSearch-R1 (mmsearch_r1_score.py, from Search-R1), MMSearch
    (score/f1_score.py) and infoseek_eval (all SQuAD's): lowercase, delete ASCII punctuation
    (`string.punctuation` only: curly quotes and emoji stay, "shiba-inu" -> "shibainu"), replace
    the words a / an / the by a space, collapse whitespace. None -> ""."""
    text = "".join(ch for ch in ("" if s is None else str(s)).lower() if ch not in ASCII_PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def em_check(pred: str | None, golds: list[str]) -> float:
    """MMSearch-R1's em_check: the normalised prediction equals a normalised gold (an empty
    prediction equals a gold that normalises to "", as there). None (no prediction) -> 0."""
    p = squad_normalize(pred)
    return float(pred is not None and any(squad_normalize(g) == p for g in golds))


def subem_check(pred: str | None, golds: list[str]) -> float:
    """MMSearch-R1's subem_check: a normalised gold is a plain substring of the normalised
    prediction (no word boundaries: gold "ES" is inside "united states"). None -> 0."""
    p = squad_normalize(pred)
    return float(pred is not None and any(squad_normalize(g) in p for g in golds))


def extract_answer(text: str | None) -> str | None:
    """MMSearch-R1's extract_solution: the last closed <answer>...</answer> (across lines),
    stripped; None without one (an unclosed "<answer>Danube" included)."""
    found = re.findall(r"<answer>(.*?)</answer>", text or "", re.DOTALL)
    return found[-1].strip() if found else None


def token_f1(pred: str | None, gold: str) -> float:
    """MMSearch's get_f1_score (SQuAD token F1 of normalised strings): 1 when both are empty,
    0 when one is. None (no prediction) -> 0, as a sample without a result there."""
    if pred is None:
        return 0.0
    p, g = squad_normalize(pred).split(), squad_normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return (2 * precision * recall) / (precision + recall)


def numbers_in(text: str) -> float | list[float]:
    """InfoSeek's process_numerical_answer: the first two numbers as a range, one number, or [0,
    0]."""
    nums = []
    spaced = re.sub(r"(?<=\d)-", " - ", text)
    for n in re.findall(r"[-+]?[.]?[\d]+(?:,\d\d\d)*[\.]?\d*(?:[eE][-+]?\d+)?", spaced)[:2]:
        n = n.replace(",", "").strip(".")
        nums.append(float(n.split(".")[0] if n.count(".") > 1 else n))
    if len(nums) == 2:
        return nums if nums[0] <= nums[1] else nums[0]
    return nums[0] if nums else [0.0, 0.0]


def gold_range(golds: list) -> list[float] | None:
    """InfoSeek's numeric gold: the first answer_eval item's {"range": [lo, hi]}, else None."""
    return next(([float(x) for x in g["range"][:2]] for g in golds
                 if isinstance(g, dict) and "range" in g), None)


def infoseek_score(pred: str | None, golds: list) -> float:
    """InfoSeek: numeric golds {"range": [lo, hi]}: a predicted number inside it, or a predicted
    range inside it or with IoU >= 0.5; otherwise SQuAD exact match to an alias in answer_eval
    (Time questions too: no +/-1 year)."""
    rng = gold_range(golds)
    if rng is None:
        p = squad_normalize(pred)
        return float(pred is not None and any(p == squad_normalize(g) for g in golds))
    lo, hi, p = rng[0], rng[1], numbers_in(pred or "")
    if not isinstance(p, list):
        return float(lo <= p <= hi)
    if lo <= p[0] <= hi and lo <= p[1] <= hi:
        return 1.0
    overlap = max(0.0, min(p[1], hi) - max(p[0], lo))
    return float(overlap / ((p[1] - p[0]) + (hi - lo) + 2e-12 - overlap) >= 0.5 - 1e-12)


INFOSEEK_SPLITS = ("unseen_question", "unseen_entity")
INFOSEEK_TYPES = {"time": "score_time", "numerical": "score_num", "string": "score_string"}


def infoseek_split(split: str) -> str:
    """The evaluator's split rule: `data_split` ending in unseen_question, else unseen_entity."""
    return INFOSEEK_SPLITS[0] if split.endswith(INFOSEEK_SPLITS[0]) else INFOSEEK_SPLITS[1]


def pct2(scores: list[float]) -> float | None:
    """The evaluator's x100 rounded to 2 places of a mean; None for no rows (it prints 0.0)."""
    return round(sum(scores) / len(scores) * 100, 2) if scores else None


def infoseek_summary(records: list[dict], scores: list[float | None]) -> dict:
    """InfoSeek's evaluate() on the scored records (a None score: no prediction, not counted):
    per split its `score` and, by question type, `score_time`, `score_num`, `score_string` (in %,
    rounded to 2 places; time and string need the question-type file), and `final_score` =
    round(harmonic mean of the rounded split scores, 2) when the reference holds both splits,
    else the one split's score; `aggregation` says which."""
    out, present = {}, {infoseek_split(r["split"]) for r in records}
    typed = all(r.get("qtype") for r in records)
    for split in (s for s in INFOSEEK_SPLITS if s in present):
        rows = [(r, s) for r, s in zip(records, scores)
                if s is not None and infoseek_split(r["split"]) == split]
        d = {"score": pct2([s for _, s in rows]) or 0.0, "n": len(rows)}
        for key in INFOSEEK_TYPES.values():
            if typed:
                d[key] = pct2([s for r, s in rows
                               if INFOSEEK_TYPES.get(r["qtype"].lower(), "score_string") == key])
            elif key == "score_num":
                d[key] = pct2([s for r, s in rows if gold_range(r["golds"]) is not None])
        out[f"{split}_score"] = d
    if len(present) == 2:
        a, b = (out[f"{s}_score"]["score"] or 1e-12 for s in INFOSEEK_SPLITS)
        out["final_score"] = round(2 / (1 / a + 1 / b), 2)
        out["aggregation"] = ("official final_score: harmonic mean of the unseen_question and "
                              "unseen_entity scores, each rounded to 2 places (0 -> 1e-12), "
                              "rounded to 2 places")
    else:
        [split] = present
        out["final_score"] = out[f"{split}_score"]["score"]
        out["aggregation"] = (f"the {split} split only: its accuracy in % (2 places); the official "
                              "final_score is the harmonic mean of unseen_question and "
                              "unseen_entity and needs both")
    return out


OPTION_LETTER = re.compile(r"\W*\(?([A-Za-z])\)?[.:)]?\W*")


def letter_match(pred: str | None, letter: str | None) -> float:
    """LiveVQA: the answer is the gold option letter (`Ground_Truth`): "B", "(b)", "B." count;
    "B. Rome" is left to the answer-text rule."""
    p, g = (OPTION_LETTER.fullmatch(x or "") for x in (pred, letter))
    return float(bool(p and g) and p.group(1).upper() == g.group(1).upper())
