"""lras.py's published formats: JEC-QA / LawBench / LexEval files -> records, and their
official scorers.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path


from common.errors import UserError
from common.data import read_records, require
from common.judge import extract_choice
from common.runlog import RunLog, bar_plot, trajectory_html, write_json
from common.stats import rate_bars


# =============================================================================================
# lras.py: JEC-QA / LawBench / LexEval
# lras.py's BENCHMARKS table names each published schema's fields and rule; lras.score applies the rules.
# Below the readers: the files lras.py's stages write (lras.py computes every number in them).
# =============================================================================================
LEGAL_MCQ_RULES = ("choice", "jecqa_set", "lawbench_mcq", "lexeval_exact")   # records of type "mcq"


def lawbench_gold(gold: str) -> tuple[str | None, list[str]]:
    """LawBench golds: "正确答案：B。" (MCQ), "罪名:X;Y" (charges), else free text (rule None)."""
    if m := re.match(r"\s*正确答案\s*[:：]\s*([A-D]+)", gold):
        return "lawbench_mcq", [m.group(1)]
    if m := re.match(r"\s*罪名\s*[:：](.+)", gold):
        return "lawbench_charge_f1", [c.strip(" 。") for c in re.split(r"[;；]", m.group(1)) if c.strip(" 。")]
    return None, [gold.strip()]


def lexeval_letters(pred: str) -> str:
    """LexEval's find_valid_substrings: cut at 解析/分析, drop separators, keep runs of A-E without
    repeats, join them, de-duplicate in order (the prediction's option letters)."""
    s = pred.split("解析")[0].split("分析")[0]
    s = re.sub(r"[、.,;，和 ]", "", s)
    runs = [r for r in re.findall(r"[ABCDE]{1,5}", s) if len(r) == len(set(r))]
    return "".join(dict.fromkeys("".join(runs)))


def lawbench_charge_f1(pred: str, charges: list[str], golds: list[str]) -> float:
    """LawBench charge prediction: F1 of the charge names found in the prediction against the gold set."""
    found, gold = {c for c in charges if c in pred}, set(golds)
    hit = len(found & gold)
    return 2 * hit / (len(found) + len(gold)) if hit else 0.0


def legal_options(opts, where: str, field: str | None) -> dict[str, str]:
    """Options as {letter: text}: a dict, a list (lettered A, B, ...) or either as a JSON string; empty
    options are left out (an all-empty CSV column is not an option)."""
    if isinstance(opts, str):
        try:
            opts = json.loads(opts)
        except ValueError:
            raise UserError(f"{where}: options field {field!r} is not JSON (a dict or list).") from None
    opts = {chr(65 + i): o for i, o in enumerate(opts)} if isinstance(opts, list) else opts
    if not isinstance(opts, dict) or not all(isinstance(v, (str, type(None))) for v in opts.values()):
        raise UserError(f"{where}: options must map letters to strings, got {str(opts)[:60]!r}.")
    return {k.strip(): v.strip() for k, v in sorted(opts.items()) if v and v.strip()}


def legal_fields(row: dict, where: str, schemas: dict, generic: dict) -> tuple[str, dict, object, str | None]:
    """(prompt text, options, raw answer, rule or None = decide per row) of one row, read with the first
    schema whose `detect` fields the row has, else with the generic map (options also from columns A..T)."""
    spec = next((s for s in schemas.values() if all(f in row for f in s["detect"])), None)
    if spec is None:
        spec = dict(prompt=("instruction", generic["question"]), answer=generic["answer"], rule=None)
        require(row, where, generic["question"], generic["answer"])
        opts = row.get(generic["options"]) or {k: v for k, v in row.items() if re.fullmatch("[A-T]", k)}
    else:
        require(row, where, spec["prompt"][-1], *[spec[k] for k in ("options",) if k in spec], spec["answer"])
        opts = row[spec["options"]] if "options" in spec else {}
    text = "\n".join(str(row[f]) for f in spec["prompt"] if row.get(f) not in (None, ""))
    raw, rule = row[spec["answer"]], spec["rule"]
    if rule == "lexeval_exact" and not re.fullmatch(r"[A-E]+", str(raw).strip()):
        rule = None   # LexEval's generation tasks: decided per row
    return text, legal_options(opts, where, spec.get("options", generic["options"])), raw, rule


def read_legal_qa(path: str, schemas: dict, generic: dict, answer_rule) -> list[dict]:
    """A legal QA file in its published schema -> lras.py's records, each with its benchmark's scoring
    rule (`rule`). MCQ is decided per row: options and a gold made of their letters, with or without a
    prefix; `answer_rule(gold)` names the rule of any other gold. Record: {"id", "task", "rule", "type",
    "question", "options", "answer", "golds", "support": [], "hops": None, "split": "user", "charges"}."""
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
            letters = extract_choice("".join(golds) if isinstance(raw, list) else golds[0], "".join(opts) or "ABCDE")
            if letters is None:
                raise UserError(f"{where}: MCQ answer {raw!r} is not option letter(s) from {sorted(opts)}.")
            rule, golds = rule or "choice", [letters]
        else:
            golds = [g.strip() for g in golds]
        rule = rule or answer_rule(golds[0])
        out.append(dict(id=str(row.get("id") or where), task=str(row.get("task") or Path(path).stem), rule=rule,
                        type="mcq" if rule in LEGAL_MCQ_RULES else "short", question=text.strip(), options=opts,
                        answer=golds[0], golds=golds, support=[], hops=None, split="user"))
    for r in out:   # (lras deviation 8) LawBench's charge list has 189 names; here: the charges named in this file
        r["charges"] = sorted(set(charges)) if r["rule"] == "lawbench_charge_f1" else []
    return out


def legal_predictions(path: str, records: list[dict], ids_from: str) -> list[str | None]:
    """Another model's answers, {"id", "prediction"} rows matched to `records` by id (a record without
    one, or with a null prediction, has no answer: None); ids_from names the file the ids come from."""
    preds = {str(r.get("id")): r.get("prediction") for _, r in read_records(path, "predictions file")}
    if not set(preds) & {r["id"] for r in records}:
        raise UserError(f"no id in {path} matches a question of the evaluated set; write "
                        f'{{"id": ..., "prediction": ...}} rows with the ids of {ids_from}.')
    return [None if preds.get(r["id"]) is None else str(preds[r["id"]]) for r in records]


def check_legal_files(corpus_file: str | None, predictions: str | None) -> None:
    """lras.py's other user files, read and checked before any model loads: a corpus of {"id", "title"?,
    "text"} rows and a predictions file of {"id", "prediction"} rows (each optional)."""
    for path, what, key in ((corpus_file, "corpus file", "text"), (predictions, "predictions file", "id")):
        for where, row in read_records(path, what) if path else []:
            require(row, where, key)


def adapter_digest(adapter: str | None) -> str | None:
    """sha256 (16 hex digits) of a peft adapter's weights, None without one: two ablation variants with
    one digest trained to the same adapter."""
    path = Path(adapter or "") / "adapter_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if adapter and path.is_file() else None


def save_lras_rl(out: Path, summary: dict, rates: dict[str, float], page: list[dict], difficulty: dict) -> None:
    """lras.py's RL outputs: summary.json (train_grpo's summary, the difficulty filter's numbers and the
    histogram of the pass rates), pass_rates.png, reward_terms.png and the last step's trajectory page."""
    hist = {f"{v:.2f}": sum(abs(p - v) < 1e-9 for p in rates.values()) for v in sorted(set(rates.values()))}
    write_json(str(out / "summary.json"), {**summary, "difficulty": {**difficulty, "pass_rate_histogram": hist}})
    bar_plot({"questions": hist}, str(out / "pass_rates.png"), "pass rate before RL", "questions")
    RunLog(str(out), resume=True).plot(["rewards/acc", "rewards/format"], "reward_terms.png", "LRAS reward terms")
    trajectory_html(page, str(out / "trajectories.html"), "LRAS RL, last step")


def save_lras_eval(out: Path, results: dict, rows: list[tuple]) -> None:
    """lras.py's eval outputs from (set, rollout, acc, format) rows: results.json, samples.jsonl (one line
    per question: prediction, acc, searches, trajectory), trajectories.html (the first 12) and one line."""
    write_json(str(out / "results.json"), results)
    samples = [{"set": name, "id": r.example["id"], "prediction": r.answer, "acc": acc,
                "searches": r.tool_calls.get("text_search", 0), "trajectory": r.trajectory} for name, r, acc, _ in rows]
    RunLog(str(out)).samples(samples, "samples.jsonl")
    trajectory_html([{"title": f"[{name}/{r.example['task']}] {r.example['question']} (gold: {r.example['answer']})",
                      "trajectory": r.trajectory, "rewards": {"acc": acc, "format": fmt}}
                     for name, r, acc, fmt in rows[:12]], str(out / "trajectories.html"), "LRAS eval")
    toy = results["search"]["toy"]
    print(f"[eval] toy score {results['score']['toy']:.3f} (accuracy), search rate {toy['search_rate']:.3f}, "
          f"searches/question {toy['searches_per_question']:.2f}, failures without search "
          f"{toy['failures_without_search']} -> {out}/results.json")


def save_lras_ablation(out: Path, table: dict[str, dict], n_questions: int, rule: str) -> list[list[str]]:
    """lras.py's ablation outputs: results.json (the table, its scoring rule, and the variants whose
    `adapter_sha256` is one: identical adapters, not a comparison, said in one line), ablate.png
    (accuracy with its 95 % interval, search rate) and a one-line summary. Returns the identical groups."""
    digests = Counter(r["adapter_sha256"] for r in table.values() if r["adapter_sha256"])
    same = [[n for n, r in table.items() if r["adapter_sha256"] == d] for d, c in digests.items() if c > 1]
    if same:
        print(f"[ablate] identical adapters, not a comparison: {same}")
    write_json(str(out / "results.json"), {"table": table, "identical_adapters": same, "questions": n_questions,
                                           "rule": rule})
    acc, rows = "accuracy (95 % interval)", list(table.values())
    bars = {acc: [r["accuracy"] for r in rows], "search rate": [r["search_rate"] for r in rows]}
    rate_bars(str(out / "ablate.png"), list(table), bars, {acc: [r["ci95"] for r in rows]},
              f"LRAS ablation, {n_questions} held-out toy questions")
    print("[ablate] " + " | ".join(f"{k}: acc {r['accuracy']:.3f} {r['ci95']}" for k, r in table.items()))
    return same


