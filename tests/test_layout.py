# Run: pytest tests/test_layout.py -q        (a second; reads the source, runs nothing)
"""The layout rules of STYLE.md, checked on the real tree and, once each, on a planted violation.

One home per kind of code: the paper in its script; published formats and official scorers in
`common/benchmarks/<script>.py`, imported by that script alone; offline stand-ins in
`common/standins/`; tools in `common/perf/`; a top-level `common/` module is shared by two or
more scripts or sits on the GRPO path. Imports go one way, with no circles and no imports hidden
inside functions; code never reads `docs/`; lines stay within 100 columns.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_COLUMNS = 100
# Third-party imports that may stay inside a function, with the reason. Our own modules and the
# standard library never may: an import inside a function hides a circle or an order problem.
LATE_OK = {
    "matplotlib": "plots only; slow to import and unused by most stages",
    "transformers": "heavy; only where a model or its output classes are touched",
    "peft": "heavy; only where an adapter is built or loaded",
    "bitsandbytes": "CUDA-only optional dependency (NF4)",
    "trl": "optional: only the benchmark's TRL side imports it",
    "yaml": "optional: only a user's YAML probe file needs it",
    "pyarrow": "optional: only parquet files need it",
    "datasets": "optional: only hub datasets need it",
    "safetensors": "only where adapter weights are read",
    "tokenizers": "only where the tiny tokenizer is built",
    "torch": "only in modules that must import without torch (the GPU check's planner)",
    "PIL": "only where an image is drawn",
    "numpy": "only where the GPU check summarises numbers",
}


# ---------------------------------------------------------------------------------------------
# the checker: a tree -> its modules, imports and violations
# ---------------------------------------------------------------------------------------------
def our_files(root: Path) -> dict[str, Path]:
    """{module name: path} of the scripts at the top and everything under common/."""
    files = {p.stem: p for p in root.glob("*.py")}
    for p in (root / "common").rglob("*.py"):
        parts = p.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = p
    return files


def imports_of(path: Path, ours: set[str]) -> list[tuple[str, int, bool]]:
    """[(module, line, inside a function)] for every import of `path`, ours or not."""
    tree, out = ast.parse(path.read_text()), []

    def visit(node, in_fn: bool):
        for child in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_fn) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                subs = [f"{child.module}.{a.name}" for a in child.names]
                out.extend((m if m in ours else child.module, child.lineno, in_fn) for m in subs)
            visit(child, fn)
    visit(tree, False)
    return out


def graph(root: Path) -> dict[str, set[str]]:
    files = our_files(root)
    ours = set(files)
    g = {m: set() for m in files}
    for m, p in files.items():
        for dep, _, _ in imports_of(p, ours):
            while dep not in ours and "." in dep:
                dep = dep.rsplit(".", 1)[0]
            if dep in ours and dep != m and dep != "common":
                g[m].add(dep)
    return g


def circles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    g, index, low, stack, on, out = graph(root), {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def late_imports(root: Path) -> list[str]:
    files = our_files(root)
    bad = []
    for m, p in files.items():
        for dep, line, in_fn in imports_of(p, set(files)):
            if in_fn and dep.split(".")[0] not in LATE_OK:
                bad.append(f"{p.relative_to(root)}:{line} imports {dep} inside a function")
    return bad


def reach(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in g[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def scripts(root: Path) -> list[str]:
    return sorted(p.stem for p in root.glob("*.py"))


def lonely_core_modules(root: Path) -> list[str]:
    """Top-level common/ modules used by fewer than two scripts and off the GRPO path."""
    g = graph(root)
    users = {m: [s for s in scripts(root) if m in reach(g, s)] for m in g}
    grpo_path = reach(g, "common.grpo") | {"common.grpo"} if "common.grpo" in g else set()
    return [f"{m} is used by {users[m] or 'no script'} only" for m in sorted(g)
            if m.count(".") == 1 and m.startswith("common.") and m not in grpo_path
            and our_files(root)[m].name != "__init__.py"
            and m != "common.errors" and len(users[m]) < 2]


def foreign_benchmark_imports(root: Path) -> list[str]:
    """common/benchmarks/<x>.py is imported by x.py alone; the core imports no per-script module."""
    g, bad = graph(root), []
    for m, deps in g.items():
        for d in deps:
            if d.startswith("common.benchmarks.") and m != d.rsplit(".", 1)[1]:
                bad.append(f"{m} imports {d}")
            if (m.count(".") == 1 and m.startswith("common.")
                    and d.startswith(("common.benchmarks.", "common.standins."))):
                bad.append(f"the core module {m} imports the per-script module {d}")
    return bad


def docs_paths(root: Path) -> list[str]:
    """String constants in code (not docstrings) that name a path under docs/."""
    bad = []
    for p in our_files(root).values():
        tree = ast.parse(p.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                        ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)
                      and isinstance(n.body[0].value, ast.Constant)}
        # "docs" alone counts where it builds a path: an operand of / or an argument of a call
        path_parts = {id(x) for n in ast.walk(tree) if isinstance(n, ast.BinOp)
                      and isinstance(n.op, ast.Div) for x in (n.left, n.right)}
        path_parts |= {id(x) for n in ast.walk(tree) if isinstance(n, ast.Call) for x in n.args}
        for n in ast.walk(tree):
            if (isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
                    and (n.value.startswith(("docs/", "./docs/"))
                         or (n.value == "docs" and id(n) in path_parts))):
                bad.append(f"{p.relative_to(root)}:{n.lineno} names {n.value!r}")
    return bad


def long_lines(root: Path) -> list[str]:
    paths = list(our_files(root).values()) + sorted((root / "tests").rglob("*.py"))
    return [f"{p.relative_to(root)}:{i} has {len(line)} columns"
            for p in paths for i, line in enumerate(p.read_text().splitlines(), 1)
            if len(line) > MAX_COLUMNS]


RULES = {"circles": circles, "late_imports": late_imports, "lonely": lonely_core_modules,
         "foreign_benchmarks": foreign_benchmark_imports, "docs_paths": docs_paths,
         "long_lines": long_lines}


# ---------------------------------------------------------------------------------------------
# the real tree
# ---------------------------------------------------------------------------------------------
PENDING: set[str] = set()   # a rule the tree does not keep yet runs as a strict xfail


@pytest.mark.parametrize("rule", [pytest.param(r, marks=pytest.mark.xfail(strict=True))
                                  if r in PENDING else r for r in RULES])
def test_the_tree_keeps_the_rule(rule):
    assert RULES[rule](ROOT) == []


# ---------------------------------------------------------------------------------------------
# each rule fails on a planted violation (and passes on the clean plant)
# ---------------------------------------------------------------------------------------------
CLEAN = {
    "a.py": "from common.benchmarks.a import read\nfrom common.core import f\n",
    "b.py": "from common.core import f\nfrom common.standins.toy import world\n",
    "common/__init__.py": "",
    "common/core.py": "import json\n\n\ndef f():\n    import matplotlib\n    return json\n",
    "common/benchmarks/__init__.py": "",
    "common/benchmarks/a.py": "from common.core import f\n\n\ndef read(path):\n    return path\n",
    "common/standins/__init__.py": "",
    "common/standins/toy.py": "def world():\n    return {'docs': 1}\n",
}
PLANTS = {
    "circles": {"common/core.py": "from common.other import g\n\n\ndef f():\n    return g\n",
                "common/other.py": "from common.core import f\n\n\ndef g():\n    return f\n"},
    "late_imports": {"common/core.py": "def f():\n    from common.standins.toy import world\n"
                                       "    return world\n"},
    "lonely": {"common/alone.py": "X = 1\n", "a.py": "from common.alone import X\n"},
    "foreign_benchmarks": {"b.py": "from common.benchmarks.a import read\n"},
    "docs_paths": {"common/standins/toy.py": "from pathlib import Path\n\n\ndef world():\n"
                                             "    return (Path('.') / 'docs'"
                                             " / 'w.json').read_text()\n"},
    "long_lines": {"a.py": "X = '" + "x" * 100 + "'\n"},
}


def plant(root: Path, extra: dict) -> Path:
    for rel, text in {**CLEAN, **extra}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "tests").mkdir(exist_ok=True)
    return root


def test_the_clean_plant_keeps_every_rule(tmp_path):
    root = plant(tmp_path, {})
    assert {name: rule(root) for name, rule in RULES.items()} == {name: [] for name in RULES}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_catches_its_planted_violation(rule, tmp_path):
    root = plant(tmp_path, PLANTS[rule])
    assert RULES[rule](root) != []
