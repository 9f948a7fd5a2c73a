"""lras.py's published formats (JEC-QA, LawBench, LexEval, their CSV exports) -> records, and
their official scorers; nothing else (lras.py reads its own files and writes its own outputs).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from common.errors import UserError
from common.data import read_records, require
from common.judge import extract_choice


# =============================================================================================
# lras.py: JEC-QA / LawBench / LexEval
# lras.py's BENCHMARKS table names each published schema's fields and rule;
# lras.score applies the rules.
# =============================================================================================
LEGAL_MCQ_RULES = ("choice", "jecqa_set", "lawbench_mcq", "lexeval_exact")   # records of type "mcq"


def lawbench_gold(gold: str) -> tuple[str | None, list[str]]:
    """LawBench golds: "正确答案：B。" (MCQ), "罪名:X;Y" (charges), else free text (rule None)."""
    if m := re.match(r"\s*正确答案\s*[:：]\s*([A-D]+)", gold):
        return "lawbench_mcq", [m.group(1)]
    if m := re.match(r"\s*罪名\s*[:：](.+)", gold):
        return "lawbench_charge_f1", [c.strip(" 。") for c in re.split(r"[;；]", m.group(1))
                                      if c.strip(" 。")]
    return None, [gold.strip()]


def lexeval_letters(pred: str) -> str:
    """LexEval's find_valid_substrings: cut at 解析/分析, drop separators, keep runs of A-E without
    repeats, join them, de-duplicate in order (the prediction's option letters)."""
    s = pred.split("解析")[0].split("分析")[0]
    s = re.sub(r"[、.,;，和 ]", "", s)
    runs = [r for r in re.findall(r"[ABCDE]{1,5}", s) if len(r) == len(set(r))]
    return "".join(dict.fromkeys("".join(runs)))


def lawbench_charge_f1(pred: str, charges: list[str], golds: list[str]) -> float:
    """LawBench charge prediction: F1 of the charge names found in the prediction against the
    gold set."""
    found, gold = {c for c in charges if c in pred}, set(golds)
    hit = len(found & gold)
    return 2 * hit / (len(found) + len(gold)) if hit else 0.0


def legal_options(opts, where: str, field: str | None) -> dict[str, str]:
    """Options as {letter: text}: a dict, a list (lettered A, B, ...) or either as a JSON
    string; empty options are left out (an all-empty CSV column is not an option)."""
    if isinstance(opts, str):
        try:
            opts = json.loads(opts)
        except ValueError:
            raise UserError(f"{where}: options field {field!r} is not JSON "
                            f"(a dict or list).") from None
    opts = {chr(65 + i): o for i, o in enumerate(opts)} if isinstance(opts, list) else opts
    if (not isinstance(opts, dict)
            or not all(isinstance(v, (str, type(None))) for v in opts.values())):
        raise UserError(f"{where}: options must map letters to strings, got {str(opts)[:60]!r}.")
    return {k.strip(): v.strip() for k, v in sorted(opts.items()) if v and v.strip()}


def legal_fields(row: dict, where: str, schemas: dict,
                 generic: dict) -> tuple[str, dict, object, str | None]:
    """(prompt text, options, raw answer, rule or None = decide per row) of one row, read with
    the first schema whose `detect` fields the row has, else with the generic map (options also
    from columns A..T)."""
    spec = next((s for s in schemas.values() if all(f in row for f in s["detect"])), None)
    if spec is None:
        spec = dict(prompt=("instruction", generic["question"]), answer=generic["answer"],
                    rule=None)
        require(row, where, generic["question"], generic["answer"])
        opts = (row.get(generic["options"])
                or {k: v for k, v in row.items() if re.fullmatch("[A-T]", k)})
    else:
        require(row, where, spec["prompt"][-1], *[spec[k] for k in ("options",) if k in spec],
                spec["answer"])
        opts = row[spec["options"]] if "options" in spec else {}
    text = "\n".join(str(row[f]) for f in spec["prompt"] if row.get(f) not in (None, ""))
    raw, rule = row[spec["answer"]], spec["rule"]
    if rule == "lexeval_exact" and not re.fullmatch(r"[A-E]+", str(raw).strip()):
        rule = None   # LexEval's generation tasks: decided per row
    return text, legal_options(opts, where, spec.get("options", generic["options"])), raw, rule


def read_legal_qa(path: str, schemas: dict, generic: dict, answer_rule) -> list[dict]:
    """A legal QA file in its published schema -> lras.py's records, each with its benchmark's
    scoring rule (`rule`). MCQ is decided per row: options and a gold made of their letters, with
    or without a prefix; `answer_rule(gold)` names the rule of any other gold. Record: {"id",
    "task", "rule", "type", "question", "options", "answer", "golds", "support": [], "hops": None,
    "split": "user", "charges"}."""
    out, charges = [], []
    for where, row in read_records(path, "benchmark file"):
        text, opts, raw, rule = legal_fields(row, where, schemas, generic)
        golds = [str(g) for g in raw] if isinstance(raw, list) else [str(raw)]
        if not text.strip() or not any(g.strip() for g in golds):
            raise UserError(f"{where}: empty question or answer.")
        if rule == "lawbench":
            rule, golds = lawbench_gold(golds[0])
            charges += golds if rule == "lawbench_charge_f1" else []
        elif rule == "lexeval_exact":
            golds = [golds[0].strip()]
        elif rule == "jecqa_set" or (rule is None and len(opts) >= 2):
            letters = extract_choice("".join(golds) if isinstance(raw, list) else golds[0],
                                     "".join(opts) or "ABCDE")
            if letters is None:
                raise UserError(f"{where}: MCQ answer {raw!r} is not option letter(s) "
                                f"from {sorted(opts)}.")
            rule, golds = rule or "choice", [letters]
        else:
            golds = [g.strip() for g in golds]
        rule = rule or answer_rule(golds[0])
        out.append(dict(id=str(row.get("id") or where),
                        task=str(row.get("task") or Path(path).stem), rule=rule,
                        type="mcq" if rule in LEGAL_MCQ_RULES else "short", question=text.strip(),
                        options=opts, answer=golds[0], golds=golds, support=[], hops=None,
                        split="user"))
    # (lras deviation 8) LawBench's charge list has 189 names; here: the charges named in this file
    for r in out:
        r["charges"] = sorted(set(charges)) if r["rule"] == "lawbench_charge_f1" else []
    return out
