"""gog.py's published formats, read only: visual search QA files (FVQA, InfoSeek, MMSearch,
SimpleVQA, LiveVQA, DynVQA) -> records, another model's answers, and the official scorers
(InfoSeek's numeric ranges and final score, MMSearch's token F1). gog.py's BENCHMARKS table names
each file's fields and its scoring rule (score_record); the aggregation is gog.py's.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np

from common.data import open_image, read_records, require
from common.errors import UserError
from common.judge import exact_match, normalize_answer


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
        answers = [str(g.get("wikidata", g.get("range"))) if isinstance(g, dict) else str(g)
                   for g in golds]
        image = resolve_image(field_at(r, spec["image"]), name, where, Path(path).parent, image_dir,
                              spec.get("image_is_id"))
        split = str(field_at(r, spec["split"])) if spec["split"] else "all"
        out.append({"id": str(field_at(r, spec["id"])), "benchmark": name, "kind": name,
                    "golds": golds,
                    "answers": answers,
                    "question": question_text(field_at(r, spec["question"]), where),
                    "split": split, "image": image, "target": None, "target_box": None})
    return out


def read_predictions(path: str) -> dict[str, str]:
    """Another model's answers: {record id: answer} from {"id" | "data_id", "answer" |
    "prediction"}."""
    out = {}
    for where, r in read_records(path, "predictions file"):
        rid, ans = r.get("id", r.get("data_id")), r.get("answer", r.get("prediction"))
        if rid is None or ans is None:
            raise UserError(f'{where}: a prediction needs "id" (or "data_id") and "answer" '
                            '(or "prediction").')
        out[str(rid)] = str(ans)
    return out


# --- the scoring rules, each as the benchmark's own code computes it ---
def token_f1(pred: str | None, gold: str) -> float:
    """SQuAD token F1 of normalised strings (MMSearch end2end)."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum(min(p.count(t), g.count(t)) for t in set(p) & set(g))
    return 0.0 if common == 0 else 2 * common / (len(p) + len(g))


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


def infoseek_score(pred: str | None, golds: list) -> float:
    """InfoSeek: numeric golds {"range": [lo, hi]}: a predicted number inside it, or a predicted
    range
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


def infoseek_final(splits: list[str], scores: list[float]) -> float | None:
    """InfoSeek's final score in %, as its evaluator computes it: the harmonic mean of the accuracy
    on its unseen-question and unseen-entity splits; None unless both splits are present."""
    q = [s for split, s in zip(splits, scores) if split.endswith("unseen_question")]
    e = [s for split, s in zip(splits, scores) if not split.endswith("unseen_question")]
    if not (q and e):
        return None
    a, b = max(100 * np.mean(q), 1e-12), max(100 * np.mean(e), 1e-12)
    return float(2 / (1 / a + 1 / b))
