"""Readers for the published benchmark files the five papers report on, each converted to its
script's own record format. Plumbing, not the papers' ideas: each reader maps one published
schema (field names, answer markers, image layout) onto the script's records, reading the file
with `common.data.read_records` and failing with `file:line` sentences. The scoring rule of each
benchmark stays in its script, next to the numbers it produces.

One section per script, in the order of the README.
"""
from __future__ import annotations


# --- PRM benchmarks (prm_bench.py) ---
# Each published file -> prm_bench.py's trajectory records (see its docstring); prm_bench.py validates them.
from pathlib import Path  # noqa: E402  (imports kept inside this section: one block per script)

from common.cli import UserError  # noqa: E402
from common.data import require  # noqa: E402


def prm_step(text, label: str | None, error_type: str | None = None) -> dict:
    """One step of a prm_bench.py record."""
    return {"text": str(text), "tool_call": None, "observation": None, "tool_image": None, "knowledge": None,
            "label": label, "error_type": error_type}


def _line_of(where: str) -> str:
    """The name of a converted row without an id: its line ("3") or item ("item 3") in the file."""
    return where.rsplit(":", 1)[-1]


def _text_record(rid, question, category: str, subcategory, source, steps: list[dict], images=(),
                 answers=()) -> dict:
    return {"id": str(rid), "question": str(question or "-"), "images": list(images), "answers": list(answers),
            "final_answer": None, "category": category, "subcategory": str(subcategory),
            "source": str(source or ""), "steps": steps}


def _from_visualprocessbench(where: str, row: dict) -> dict:
    """OpenGVLab/VisualProcessBench test.jsonl: process_correctness 1 / 0 / -1 = correct / neutral / incorrect."""
    require(row, where, "question", "response")
    steps, marks = row["response"].get("steps"), row["response"].get("process_correctness")
    if not isinstance(steps, list) or not steps or not isinstance(marks, list) or len(steps) != len(marks):
        raise UserError(f"{where}: response.steps and response.process_correctness must be lists of equal "
                        "length.")
    if any(m not in (1, 0, -1) for m in marks):
        raise UserError(f"{where}: process_correctness holds {marks}; expected 1, 0 or -1 per step.")
    labels = [{1: "correct", 0: "neutral", -1: "incorrect"}[m] for m in marks]
    images = [row["image"]] if isinstance(row.get("image"), str) else row.get("image") or []
    answers = [str(row["answer"])] if row.get("answer") else []
    return _text_record(row.get("id", _line_of(where)), row["question"], "VisualProcessBench",
                        row.get("data_source") or "all", row.get("policy_model"),
                        [prm_step(t, lab) for t, lab in zip(steps, labels)], images, answers)


def _from_processbench(where: str, row: dict, split: str) -> dict:
    """Qwen/ProcessBench split: `label` = 0-based first wrong step (-1: none); later steps are not labelled."""
    require(row, where, "problem", "steps")
    steps, k = row["steps"], row.get("label")
    if not isinstance(k, int) or not -1 <= k < len(steps):
        raise UserError(f"{where}: label must be -1 or the index of a step (0..{len(steps) - 1}); got {k!r}.")
    labels = ["correct" if k == -1 or i < k else "incorrect" if i == k else None for i in range(len(steps))]
    return _text_record(row.get("id", _line_of(where)), row["problem"], "ProcessBench", split,
                        row.get("generator"), [prm_step(t, lab) for t, lab in zip(steps, labels)])


def _from_prmbench(rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """PRMBench JSONL: each row -> its modified process (1-based error_steps); like PRMBench's loader, each
    `redundency` row also yields the clean original once per idx, with the class `correct`."""
    out = []
    for where, row in rows:
        require(row, where, "modified_process", "classification")
        idx, cls, errs = row.get("idx", _line_of(where)), row["classification"], row.get("error_steps") or []
        if cls == "redundency" and not any(r["id"] == f"correct_{idx}" for _, r in out):
            require(row, where, "original_process")
            clean = [prm_step(t, "correct") for t in row["original_process"]]
            out.append((where, _text_record(f"correct_{idx}", row.get("original_question"), "PRMBench",
                                            "correct", "PRMBench", clean)))
        steps = [prm_step(t, "incorrect", cls) if i + 1 in errs else prm_step(t, "correct")
                 for i, t in enumerate(row["modified_process"])]
        out.append((where, _text_record(f"{cls}_{idx}", row.get("modified_question"), "PRMBench", cls,
                                        "PRMBench", steps)))
    return out


def prm_benchmark_rows(benchmark: str, rows: list[tuple[str, dict]], path: str) -> list[tuple[str, dict]]:
    """[(where, row)] of a published file -> [(where, record)]; `ours` passes the rows through."""
    if benchmark == "visualprocessbench":
        return [(w, _from_visualprocessbench(w, r)) for w, r in rows]
    if benchmark == "processbench":  # the split is the file's name (gsm8k.json -> gsm8k)
        return [(w, _from_processbench(w, r, Path(path).stem)) for w, r in rows]
    if benchmark == "prmbench":
        return _from_prmbench(rows)
    return rows
