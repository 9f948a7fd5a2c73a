"""prm_bench.py's published formats, read only: VisualProcessBench / ProcessBench / PRMBench files
-> prm_bench's step-labelled record, the record's validator and reader, an external PRM's
predictions. The writer, the HTML view, the metrics and the toy set are prm_bench.py's (its step
builders: common/standins/prm_steps.py).

Record (a JSONL line; paths relative to the images folder): {"id", "question", "images": [path],
"answers": [str], "final_answer", "category", "subcategory", "source", "injected": [{"step",
"error_type"}], "steps": [{"text", "tool_call": null | {"name", "arguments"}, "observation",
"tool_image": path | null, "knowledge": [fact] | null, "label": correct | incorrect | neutral |
null, "error_type"}]}. A null label (not annotated) may only follow an incorrect step. The taxonomy
and the error types are the script's, passed in.
"""
from __future__ import annotations

from pathlib import Path

from common.data import open_image, read_records, require
from common.errors import UserError
from common.standins.prm_steps import prm_step

PRM_LABELS = ("correct", "incorrect", "neutral")
# the category of converted records
PRM_BENCHMARKS = ("VisualProcessBench", "ProcessBench", "PRMBench")


def _line_of(where: str) -> str:
    """The name of a converted row without an id: its line ("3") or item ("item 3") in the file."""
    return where.rsplit(":", 1)[-1]


def _text_record(rid, question, category: str, subcategory, source, steps: list[dict], images=(),
                 answers=()) -> dict:
    return {"id": str(rid), "question": str(question or "-"), "images": list(images),
            "answers": list(answers), "final_answer": None, "category": category,
            "subcategory": str(subcategory), "source": str(source or ""), "steps": steps}


def _from_visualprocessbench(where: str, row: dict) -> dict:
    """OpenGVLab/VisualProcessBench test.jsonl: process_correctness 1 / 0 / -1 =
    correct / neutral / incorrect."""
    require(row, where, "question", "response")
    steps, marks = row["response"].get("steps"), row["response"].get("process_correctness")
    if (not isinstance(steps, list) or not steps or not isinstance(marks, list)
            or len(steps) != len(marks)):
        raise UserError(f"{where}: response.steps and response.process_correctness "
                        f"must be lists of equal length.")
    if any(m not in (1, 0, -1) for m in marks):
        raise UserError(f"{where}: process_correctness holds {marks}; "
                        f"expected 1, 0 or -1 per step.")
    labels = [{1: "correct", 0: "neutral", -1: "incorrect"}[m] for m in marks]
    images = [row["image"]] if isinstance(row.get("image"), str) else row.get("image") or []
    answers = [str(row["answer"])] if row.get("answer") else []
    return _text_record(row.get("id", _line_of(where)), row["question"], "VisualProcessBench",
                        row.get("data_source") or "all", row.get("policy_model"),
                        [prm_step(t, lab) for t, lab in zip(steps, labels)], images, answers)


def _from_processbench(where: str, row: dict, split: str) -> dict:
    """Qwen/ProcessBench split: `label` = 0-based first wrong step (-1: none); later steps
    are not labelled."""
    require(row, where, "problem", "steps")
    steps, k = row["steps"], row.get("label")
    if not isinstance(k, int) or not -1 <= k < len(steps):
        raise UserError(f"{where}: label must be -1 or the index of a step "
                        f"(0..{len(steps) - 1}); got {k!r}.")
    labels = ["correct" if k == -1 or i < k else "incorrect" if i == k else None
              for i in range(len(steps))]
    return _text_record(row.get("id", _line_of(where)), row["problem"], "ProcessBench", split,
                        row.get("generator"), [prm_step(t, lab) for t, lab in zip(steps, labels)])


def _from_prmbench(rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """PRMBench JSONL, as its loader (load_data_function) reads it: each row -> its modified
    process as `<classification>_<idx>` (1-based error_steps kept as published: some lie past
    the last step); each `redundency` row also yields the clean original `correct_<idx>` once
    per idx (class `correct`); of a repeated id the first row is kept (the release repeats 5
    multi_solutions ids, with different processes). Empty step strings are kept as published."""
    out, seen, repeated = [], set(), 0
    for where, row in rows:
        require(row, where, "modified_process", "classification")
        idx = row.get("idx", _line_of(where))
        cls, errs = row["classification"], row.get("error_steps") or []
        if cls == "redundency" and f"correct_{idx}" not in seen:
            require(row, where, "original_process")
            seen.add(f"correct_{idx}")
            clean = [prm_step(t, "correct") for t in row["original_process"]]
            out.append((where, dict(_text_record(f"correct_{idx}", row.get("original_question"),
                                                 "PRMBench", "correct", "PRMBench", clean),
                                    error_steps=[])))
        if f"{cls}_{idx}" in seen:
            repeated += 1
            continue
        seen.add(f"{cls}_{idx}")
        steps = [prm_step(t, "incorrect", cls) if i + 1 in errs else prm_step(t, "correct")
                 for i, t in enumerate(row["modified_process"])]
        rec = _text_record(f"{cls}_{idx}", row.get("modified_question"), "PRMBench", cls,
                           "PRMBench", steps)
        out.append((where, dict(rec, error_steps=list(errs), clean_id=f"correct_{idx}")))
    if repeated:
        print(f"[prm_bench] PRMBench rows repeating an earlier classification and idx: "
              f"{repeated}; the first of each is kept, as PRMBench's loader does.")
    return out


def prm_benchmark_rows(benchmark: str, rows: list[tuple[str, dict]],
                       path: str) -> list[tuple[str, dict]]:
    """[(where, row)] of a published file -> [(where, record)]; `ours` passes the rows through."""
    if benchmark == "visualprocessbench":
        return [(w, _from_visualprocessbench(w, r)) for w, r in rows]
    if benchmark == "processbench":  # the split is the file's name (gsm8k.json -> gsm8k)
        return [(w, _from_processbench(w, r, Path(path).stem)) for w, r in rows]
    if benchmark == "prmbench":
        return _from_prmbench(rows)
    return rows


def validate_prm_record(rec: dict, where: str, taxonomy: dict, error_types,
                        base_dir: Path | None = None, require_labels: bool = True) -> dict:
    """Check one trajectory against the record format; a UserError names `where` (file:line) and
    the field. `taxonomy`: {category: subcategories}; `error_types`: the names an incorrect toy step
    may carry."""
    def need(ok, fld: str, msg: str):
        if not ok:
            raise UserError(f"{where}: field '{fld}' {msg}")
    for key in ("id", "question"):
        need(isinstance(rec.get(key), str) and rec[key].strip(), key, "must be a non-empty string.")
    for key in ("images", "answers"):
        need(isinstance(rec.get(key), list) and all(isinstance(x, str) and x for x in rec[key]),
             key, "must be a list of non-empty strings.")
    cat, sub, steps = rec.get("category"), rec.get("subcategory"), rec.get("steps")
    need(cat in taxonomy or cat in PRM_BENCHMARKS, "category",
         f"must be one of {', '.join([*taxonomy, *PRM_BENCHMARKS])}; got {cat!r}.")
    need(isinstance(sub, str) and (cat not in taxonomy or sub in taxonomy[cat]), "subcategory",
         f"must be one of {', '.join(taxonomy.get(cat, ('a string',)))} for {cat!r}; got {sub!r}.")
    need(isinstance(rec.get("final_answer"), (str, type(None))), "final_answer",
         "must be a string or null.")
    need(isinstance(steps, list) and steps and all(isinstance(s, dict) for s in steps), "steps",
         "must be a non-empty list of step objects.")
    for i, s in enumerate(steps):
        f, call = f"steps[{i}]", s.get("tool_call")
        label, etype = s.get("label"), s.get("error_type")
        facts = s.get("knowledge")
        # a published benchmark's step is kept as published (PRMBench has empty ones)
        need(isinstance(s.get("text"), str) and (s["text"].strip() or cat in PRM_BENCHMARKS),
             f + ".text", "must be a non-empty string.")
        need(call is None or (isinstance(call, dict) and isinstance(call.get("name"), str)
                              and isinstance(call.get("arguments", {}), dict)),
             f + ".tool_call", 'must be null or {"name": str, "arguments": {...}}.')
        for key in ("observation", "tool_image"):
            need(isinstance(s.get(key), (str, type(None))), f"{f}.{key}",
                 "must be a string or null.")
        need(s.get("tool_image") is None or call is not None, f + ".tool_image",
             "needs a tool_call that produced it.")
        need(facts is None or (isinstance(facts, list) and all(isinstance(x, str) for x in facts)),
             f + ".knowledge",
             "must be null or a list of strings (the facts the step is judged against).")
        after_error = any(x.get("label") == "incorrect" for x in steps[:i])
        need(label is not None or not require_labels or after_error, f + ".label",
             "is null before any incorrect step: "
             "this trajectory is unannotated (e.g. candidates.jsonl); "
             f"label every step with one of {', '.join(PRM_LABELS)} first.")
        need(label is None or label in PRM_LABELS, f + ".label",
             f"must be one of {', '.join(PRM_LABELS)}; got {label!r}.")
        need(label != "incorrect" or cat not in taxonomy or etype in error_types, f + ".error_type",
             f"must be one of {', '.join(error_types)} for an incorrect step; got {etype!r}.")
        need(isinstance(etype, (str, type(None))) and (label == "incorrect" or etype is None),
             f + ".error_type", f"must be null unless label is 'incorrect' (label is {label!r}).")
    inj = rec.get("injected") or []
    need(isinstance(inj, list) and all(isinstance(x, dict) and isinstance(x.get("step"), int)
                                       and 0 <= x["step"] < len(steps)
                                       and steps[x["step"]].get("error_type") == x.get("error_type")
                                       for x in inj),
         "injected", "must be a list of {step, error_type} matching those steps' labels.")
    paths = ([("images", p) for p in rec["images"]]
             + [(f"steps[{i}].tool_image", s["tool_image"])
                for i, s in enumerate(steps) if s.get("tool_image")])
    for fld, p in paths if base_dir is not None else []:
        need((base_dir / p).is_file(), fld, f"points to {base_dir / p}, which does not exist.")
    return rec


def load_prm_records(path: str, taxonomy: dict, error_types, require_labels: bool = True,
                     benchmark: str = "ours", images: str | None = None) -> list[dict]:
    """Read (common.data.read_records), convert a published benchmark's rows, validate; ids must
    be unique."""
    if not Path(path).is_file():
        raise UserError(f"trajectory file {path} does not exist "
                        f"(run --stage data, or pass --data).")
    rows = prm_benchmark_rows(benchmark, read_records(path, "trajectory file"), path)
    base, records, seen = Path(images or Path(path).parent), [], set()
    for where, rec in rows:
        validate_prm_record(rec, where, taxonomy, error_types, base, require_labels)
        if rec["id"] in seen:
            raise UserError(f"{where}: field 'id' {rec['id']!r} is used by an earlier record.")
        seen.add(rec["id"])
        records.append(dict(rec, _base=str(base)))
    return records


def prm_record_images(rec: dict) -> tuple[list, dict]:
    """(question images, {step index: tool image}) as PIL images, from memory or from disk."""
    if rec.get("_pil") is not None:
        return rec["_pil"]["images"], rec["_pil"].get("steps", {})
    base = rec["_base"]
    crops = {i: open_image(s["tool_image"], base, rec["id"]) for i, s in enumerate(rec["steps"])
             if s.get("tool_image")}
    return [open_image(p, base, rec["id"]) for p in rec["images"]], crops


def read_prm_predictions(path: str, records: list[dict]) -> list[list]:
    """An external PRM's {"id", "scores": [per step]} rows -> the raw per-step values of
    `records`, in order. Of a repeated id the first row counts (PRMBench's evaluate_function);
    rows of unknown ids are ignored. A row may hold fewer scores than its record has steps (the
    last steps are then not judged, as PRMBench counts only the labels it gets); more only for a
    PRMBench record (its evaluator counts them, against the published error_steps)."""
    rows, repeated = {}, 0
    for where, row in read_records(path, "predictions file"):
        require(row, where, "id")
        if not isinstance(row.get("scores"), list):
            raise UserError(f"{where}: field 'scores' must be a list "
                            f"with one score or verdict per step.")
        if str(row["id"]) in rows:
            repeated += 1
        else:
            rows[str(row["id"])] = (where, row["scores"])
    if repeated:
        print(f"[prm_bench] {path}: {repeated} rows repeat an earlier id; "
              f"the first row of each id counts, as in PRMBench's evaluator.")
    out = []
    for r in records:
        if r["id"] not in rows:
            raise UserError(f"{path} has no predictions for the record {r['id']!r}; "
                            f"give each record a row.")
        where, scores = rows[r["id"]]
        if len(scores) > len(r["steps"]) and "error_steps" not in r:
            raise UserError(f"{where}: {len(scores)} scores "
                            f"for the {len(r['steps'])} steps of {r['id']!r}.")
        if any(isinstance(x, (int, float)) and not 0 <= x <= 1 for x in scores):
            raise UserError(f"{where}: a score outside [0, 1] in {scores}; "
                            f"give probabilities of 'correct'.")
        out.append(scores)
    return out
