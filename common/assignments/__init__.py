"""Course assignments made from the reference code: the assignments know nothing of the papers'
math; they name functions, cut their bodies out and run the graders.

    python -m common.assignments list                    # assignments, parts, points
    python -m common.assignments make gog --out hw_gog   # a student copy with stubbed functions
    python -m common.assignments check [NAME]            # graders pass here, fail on the stubs

Each assignment is named once, in ASSIGNMENTS below: its parts (file, function, points, one line
of what to implement) and its grader, tests/assignments/test_<name>.py, whose test names start
with `test_<part>` so each part's tests run with `pytest -k <part>`. `make` copies the files git
knows of (tracked and untracked-but-not-ignored; never .git) and replaces each part's body by its
docstring + `raise NotImplementedError("<assignment>: <part>")`, signature and decorators kept
(a function without a docstring gets the part's line as one). `check` runs the grader on this
tree (every test passes) and on a stubbed copy in a temporary folder (every test fails, and
with the stub's NotImplementedError: a grader that passes on stubs is a defect, named).
Handouts: docs/assignments/<name>.md.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Part:
    name: str        # the part's name: pytest -k <name> runs its graded tests
    file: str        # path from the repository root
    function: str    # qualified name in that file ("f" or "Class.method")
    points: int
    what: str        # one line: what to implement (the stub's docstring when the code has none)


@dataclass(frozen=True)
class Assignment:
    name: str
    title: str
    parts: tuple[Part, ...]

    @property
    def tests(self) -> str:
        return f"tests/assignments/test_{self.name}.py"

    @property
    def points(self) -> int:
        return sum(p.points for p in self.parts)


ASSIGNMENTS = {a.name: a for a in (
    Assignment("core", "GRPO core (do first): advantages, loss, masks, log-probs", (
        Part("group_advantages", "common/grpo.py", "group_advantages", 15,
             "A_i = r_i - mean of its group, divided by the group std, the batch std or nothing."),
        Part("grpo_loss", "common/grpo.py", "grpo_loss", 35,
             "Clipped surrogate + beta * k3 KL, aggregated by loss_type grpo/bnpo/dr_grpo/dapo."),
        Part("splice", "common/rollout.py", "_splice", 10,
             "Append an observation / user turn to a rollout with loss mask 0, or end it."),
        Part("rollout_batch", "common/rollout.py", "rollout_batch", 20,
             "Rollouts -> [left-padded prompt | right-padded completion] + completion_mask."),
        Part("logp_chunk", "common/logprobs.py", "_logp_chunk", 20,
             "log p(target) at temperature T and the entropy, for one chunk of positions."),
    )),
    Assignment("gog", "Glance or Gaze: the GoG reward, crops, complexity levels", (
        Part("format_ok", "gog.py", "format_ok", 15,
             "r_fmt: every assistant turn holds one action: tool calls, then one <answer>."),
        Part("gog_reward", "gog.py", "gog_reward", 20,
             "r = (1 - lambda) r_acc + lambda r_fmt, with its terms."),
        Part("crop", "common/tools.py", "crop", 40,
             "Map a box in the pixels the model saw to the original image, clamp, grow, crop."),
        Part("split_levels", "gog.py", "split_levels", 25,
             "Level 2 / Level 1 question ids from pass rates, topped up to min_size."),
    )),
    Assignment("lras", "LRAS: trajectory pruning and difficulty-aware sampling", (
        Part("prune_trajectory", "lras.py", "prune_trajectory", 60,
             "Keep a search only if it found a new supporting document; None for lucky guesses."),
        Part("difficulty_sampling", "lras.py", "difficulty_sampling", 40,
             "Keep questions with 0 < p < 1; weights d = 1 - p (None when uniform)."),
    )),
    Assignment("am3safety", "AM3Safety: the turn-aware reward (Eqs. 6-9)", (
        Part("turn_aware_reward", "am3safety.py", "turn_aware_reward", 100,
             "Per-turn safety variance + lambda * hinge (Eq. 7), softmax weights, weighted sum."),
    )),
    Assignment("cot_causal", "Reasoning traces: the paradigms' loss masks and the EM judge score", (
        Part("from_segments", "cot_causal.py", "from_segments", 20,
             "[(text, mask)] -> token ids and a loss mask, each segment tokenised on its own."),
        Part("build_example", "cot_causal.py", "build_example", 45,
             "One SFT sample of the QA / QTA / QT / T-only paradigm with its exact loss mask."),
        Part("weighted_score", "common/judge.py", "weighted_score", 35,
             "Probability-weighted mean of the integer tokens 0-100; None under 0.25 mass."),
    )),
    Assignment("prm_bench", "PRM benchmark: PRMScore, ProcessBench F1, VisualProcessBench", (
        Part("prmscore", "prm_bench.py", "prmscore", 35,
             "PRMScore = mean of F1(correct steps) and F1(incorrect steps), from verdict pairs: "
             "return {'f1', 'negative_f1', 'PRMScore', 'n_steps'}; a 0/0 F1 is None."),
        Part("first_error_prediction", "prm_bench.py", "first_error_prediction", 20,
             "ProcessBench's prediction: the first step judged incorrect, -1, or None."),
        Part("processbench", "prm_bench.py", "processbench", 25,
             "acc_err, acc_corr and their harmonic mean F1."),
        Part("visualprocessbench", "prm_bench.py", "visualprocessbench", 20,
             "Macro-F1 pooled over all steps and per data source."),
    )),
)}


# ---------------------------------------------------------------------------------------------
# stubbing: one function body -> docstring + raise NotImplementedError
# ---------------------------------------------------------------------------------------------
def find_function(tree: ast.Module, qualname: str):
    """The FunctionDef named `qualname` ("f" or "Class.method") at module level, else None."""
    node, body = None, tree.body
    for name in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.ClassDef)) and n.name == name), None)
        if node is None:
            return None
        body = node.body
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def stub_source(source: str, stubs: list[tuple[str, str, str]], where: str) -> str:
    """`source` with each (qualname, message, docstring if missing) function's body replaced by
    its docstring + raise NotImplementedError(message); the header lines stay byte for byte."""
    lines, tree = source.splitlines(keepends=True), ast.parse(source)
    spans = []
    for qualname, message, fallback_doc in stubs:
        fn = find_function(tree, qualname)
        if fn is None:
            raise UserError(f"The assignment names {where}:{qualname}, which no longer exists; "
                            f"update ASSIGNMENTS in common/assignments/__init__.py.")
        first = fn.body[0]
        if first.lineno == fn.lineno:
            raise UserError(f"{where}:{qualname} has its body on the def line; put it on its own "
                            f"lines so it can be stubbed.")
        head_end = first.lineno - 1                     # 1-based last line of the header
        while lines[head_end - 1].strip() == "" or lines[head_end - 1].lstrip().startswith("#"):
            head_end -= 1                               # comments before the body are body
        indent = " " * first.col_offset
        has_doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                   and isinstance(first.value.value, str))
        if has_doc:
            doc = "".join(lines[first.lineno - 1: first.end_lineno])
        else:
            wrapped = textwrap.fill(fallback_doc, width=96 - len(indent))
            doc = textwrap.indent(f'"""{wrapped}"""', indent) + "\n"
        body = doc + f"{indent}raise NotImplementedError({message!r})\n"
        spans.append((head_end, fn.end_lineno, body, qualname))
    spans.sort()
    for (_, end, _, a), (start, _, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise UserError(f"{where}: the parts {a} and {b} overlap; stub one of them.")
    for head_end, end, body, _ in reversed(spans):
        lines[head_end:end] = [body]
    out = "".join(lines)
    ast.parse(out)                                      # a stub that does not parse is our bug
    return out


# ---------------------------------------------------------------------------------------------
# make: copy the repository, stub the parts
# ---------------------------------------------------------------------------------------------
def repo_files(root: Path) -> list[str]:
    """Files git knows of under `root`: tracked and untracked-but-not-ignored (never .git)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=root, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserError(f"{root} is not a git checkout (git ls-files failed: {e}); run this "
                        f"from the reference repository.") from e
    names = sorted({n for n in out.stdout.decode().split("\0") if n})
    return [n for n in names if (root / n).is_file()]   # tracked but deleted: left out


def stubbed_files(a: Assignment, root: Path) -> dict[str, str]:
    """{file: stubbed source} of one assignment; refuses a part whose function is gone."""
    by_file: dict[str, list[tuple[str, str, str]]] = {}
    for p in a.parts:
        if not (root / p.file).is_file():
            raise UserError(f"The assignment {a.name} names {p.file}, which no longer exists; "
                            f"update ASSIGNMENTS in common/assignments/__init__.py.")
        by_file.setdefault(p.file, []).append((p.function, f"{a.name}: {p.name}", p.what))
    return {f: stub_source((root / f).read_text(), stubs, f) for f, stubs in by_file.items()}


def make(name: str, out: Path, root: Path = ROOT, assignments: dict | None = None) -> Path:
    a = get(name, assignments)
    stubbed = stubbed_files(a, root)                    # refuse before writing anything
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; give --out a new folder.")
    for rel in repo_files(root):
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in stubbed:
            dst.write_text(stubbed[rel])
        else:
            shutil.copy2(root / rel, dst)
    return out


def get(name: str, assignments: dict | None = None) -> Assignment:
    table = ASSIGNMENTS if assignments is None else assignments
    if name not in table:
        raise UserError(f"Unknown assignment {name!r}; choose one of {', '.join(table)}.")
    return table[name]


# ---------------------------------------------------------------------------------------------
# check: graders pass on the reference and fail on the stubs
# ---------------------------------------------------------------------------------------------
def run_grader(root: Path, tests: list[str], timeout: int = 600) -> dict[str, tuple[str, str]]:
    """{test id: (outcome, message)} of one pytest run; outcome passed/failed/error/skipped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "report.xml"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", *tests], cwd=root, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if not xml.exists():
            raise RuntimeError(f"pytest wrote no report in {root}:\n{proc.stdout[-3000:]}"
                               f"{proc.stderr[-3000:]}")
        results = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            tid = f"{case.get('classname')}::{case.get('name')}"
            outcome, message = "passed", ""
            for kind in ("failure", "error", "skipped"):
                el = case.find(kind)
                if el is not None:
                    outcome = "failed" if kind == "failure" else kind
                    message = f"{el.get('message') or ''}\n{el.text or ''}"
                    break
            results[tid] = (outcome, message)
    if not results:
        raise RuntimeError(f"pytest collected no test in {root} from {tests}:\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return results


def part_of_test(test_id: str, a: Assignment) -> str | None:
    """The part a graded test belongs to: the longest part name its function name starts with."""
    fn = test_id.rsplit("::", 1)[-1]
    hits = [p.name for p in a.parts if fn.startswith(f"test_{p.name}")]
    return max(hits, key=len) if hits else None


def graded_on_stubs(a: Assignment, root: Path, table: dict) -> dict[str, tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        return run_grader(make(a.name, Path(tmp) / a.name, root, table), [a.tests])


def check(names: list[str] | None = None, root: Path = ROOT, assignments: dict | None = None,
          say=print) -> list[str]:
    """Defects (empty when every grader passes here and every graded test fails on its stubs).
    The pytest runs (one on this tree, one per stubbed copy) go two or more at a time."""
    table = ASSIGNMENTS if assignments is None else assignments
    chosen = [get(n, table) for n in (names or list(table))]
    missing = [f"{a.name}: its grader {a.tests} does not exist" for a in chosen
               if not (root / a.tests).is_file()]
    if missing:
        return missing
    for a in chosen:
        stubbed_files(a, root)                         # refuse a vanished function up front
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
        ref_job = pool.submit(run_grader, root, [a.tests for a in chosen])
        stub_jobs = {a.name: pool.submit(graded_on_stubs, a, root, table) for a in chosen}
        reference = ref_job.result()
        on_stubs = {name: job.result() for name, job in stub_jobs.items()}
    defects = []
    for a in chosen:
        mine = {t: r for t, r in reference.items()
                if t.split("::")[0].replace(".", "/").endswith(f"test_{a.name}")}
        bad = [f"{a.name}: {t} {o} on the reference" for t, (o, _) in mine.items()
               if o != "passed"]
        orphans = [t for t in mine if part_of_test(t, a) is None]
        bad += [f"{a.name}: {t} belongs to no part (name it test_<part>_...)" for t in orphans]
        graded = {part_of_test(t, a) for t in mine}
        bad += [f"{a.name}: the part {p.name} has no graded test" for p in a.parts
                if p.name not in graded]
        stubbed = on_stubs[a.name]
        if set(stubbed) != set(mine):
            bad.append(f"{a.name}: the stubbed copy ran other tests: "
                       f"{sorted(set(stubbed) ^ set(mine))}")
        for t, (o, msg) in sorted(stubbed.items()):
            if o not in ("failed", "error"):
                bad.append(f"{a.name}: {t} {o} on the stubs (a grader that passes stubs)")
            elif f"NotImplementedError: {a.name}: " not in msg:
                bad.append(f"{a.name}: {t} fails on the stubs, but not with the stub's "
                           f"NotImplementedError")
        say(f"{a.name}: {len(mine)} graded tests, {len(a.parts)} parts, {a.points} points: "
            f"{'ok' if not bad else f'{len(bad)} defects'}")
        defects += bad
    return defects


def listing(assignments: dict | None = None) -> str:
    table = ASSIGNMENTS if assignments is None else assignments
    rows = []
    for a in table.values():
        rows.append(f"{a.name} ({a.points} points): {a.title}\n  grader: pytest {a.tests}"
                    f"\n  handout: docs/assignments/{a.name}.md")
        rows += [f"  {p.points:3d}  {p.name:<22} {p.file}:{p.function}\n       {p.what}"
                 for p in a.parts]
    return "\n".join(rows)
