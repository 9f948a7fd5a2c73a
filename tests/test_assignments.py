# Run: pytest tests/test_assignments.py -q     (~30 s idle on 2 cores: 7 pytest runs of graders)
"""common.assignments: `check` passes for all six assignments (every grader passes on the
reference and every graded test fails on its stubs); stubbing keeps headers, decorators and
docstrings; `make` refuses a part whose function is gone; `check` names a grader that passes on
stubs, a test that fails on the reference, and a part without a graded test."""
import ast
import inspect
import subprocess
import sys
import textwrap

import pytest

import common.assignments as asg
from common.assignments import ASSIGNMENTS, Assignment, Part, check, make, stub_source
from common.assignments.__main__ import main
from common.errors import UserError

SOURCE = textwrap.dedent('''\
    import functools


    @functools.lru_cache(maxsize=2)
    def cached(x: int,
               y: int = 2) -> int:   # a header on two lines
        """Add them."""
        return x + y


    class Box:
        def area(self, w, h):
            # a comment is body, not header
            return w * h

        @staticmethod
        def unit():
            return 1


    def keep():
        return "kept"
    ''')


def load(text):
    space = {}
    exec(compile(text, "<stubbed>", "exec"), space)
    return space


# ---------------------------------------------------------------------------------- stubbing
def test_stub_keeps_header_decorators_and_docstring():
    out = stub_source(SOURCE, [("cached", "hw: cached", "unused"),
                               ("Box.area", "hw: area", "Multiply w by h."),
                               ("Box.unit", "hw: unit", "One.")], "toy.py")
    ref, stub = load(SOURCE), load(out)
    assert '@functools.lru_cache(maxsize=2)\ndef cached(x: int,\n           y: int = 2) -> int:' \
        '   # a header on two lines\n    """Add them."""\n    raise NotImplementedError' in out
    assert "a comment is body" not in out and '"""Multiply w by h."""' in out
    for name in ("cached", "keep"):
        assert inspect.signature(stub[name]) == inspect.signature(ref[name])
    assert stub["cached"].__doc__ == "Add them." and stub["keep"]() == "kept"
    with pytest.raises(NotImplementedError, match="hw: cached"):
        stub["cached"](1)
    with pytest.raises(NotImplementedError, match="hw: area"):
        stub["Box"]().area(2, 3)
    with pytest.raises(NotImplementedError, match="hw: unit"):
        stub["Box"].unit()                                    # still a staticmethod


def test_stub_refuses_a_function_that_no_longer_exists():
    with pytest.raises(UserError, match="toy.py:Box.volume, which no longer exists"):
        stub_source(SOURCE, [("Box.volume", "hw: v", "")], "toy.py")


def test_make_refuses_a_vanished_part_with_one_sentence(monkeypatch, tmp_path, capsys):
    broken = Assignment("broken", "t", (Part("gone", "common/grpo.py", "grpo_loss_v2", 1, "x"),))
    monkeypatch.setitem(ASSIGNMENTS, "broken", broken)
    assert main(["make", "broken", "--out", str(tmp_path / "hw")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The assignment names common/grpo.py:grpo_loss_v2, which no "
                          "longer exists") and err.count("\n") == 1
    assert not (tmp_path / "hw").exists()                     # refused before writing


def test_make_changes_only_the_parts(tmp_path):
    a = ASSIGNMENTS["core"]
    out = make("core", tmp_path / "hw")
    assert not (out / ".git").exists() and (out / a.tests).is_file()
    parts = {(p.file, p.function) for p in a.parts}
    for rel in asg.repo_files(asg.ROOT):
        if rel not in {p.file for p in a.parts}:
            assert (out / rel).read_bytes() == (asg.ROOT / rel).read_bytes(), rel
            continue
        ref_src, out_src = (asg.ROOT / rel).read_text(), (out / rel).read_text()
        ref_tree, out_tree = ast.parse(ref_src), ast.parse(out_src)
        names = [n.name for n in ref_tree.body if hasattr(n, "name")]
        assert names == [n.name for n in out_tree.body if hasattr(n, "name")], rel
        for name in names:
            seg = [ast.get_source_segment(s, asg.find_function(t, name) or next(
                n for n in t.body if getattr(n, "name", None) == name))
                for s, t in ((ref_src, ref_tree), (out_src, out_tree))]
            assert (seg[0] == seg[1]) is ((rel, name) not in parts), (rel, name)


def test_cli_list_names_every_part():
    out = subprocess.run([sys.executable, "-m", "common.assignments", "list"], cwd=asg.ROOT,
                         capture_output=True, text=True, check=True).stdout
    for a in ASSIGNMENTS.values():
        assert f"{a.name} ({a.points} points)" in out
        assert all(f"{p.file}:{p.function}" in out for p in a.parts)


# ------------------------------------------------------------------------- check on a plant
PLANT = {
    "conftest.py": "",
    "mod.py": 'def f(x):\n    """Double x."""\n    return 2 * x\n\n\ndef g():\n    return 1\n',
    "tests/assignments/test_toy.py": (
        "from mod import f, g\n\n\n"
        "def test_f_doubles():\n    assert f(2) == 4\n\n\n"
        "def test_f_exists():\n    assert callable(f)\n\n\n"      # passes on the stub: a defect
        "def test_g_is_one():\n    assert g() == 2\n"),          # fails on the reference
}


def test_check_names_the_defects_of_a_planted_grader(tmp_path):
    for rel, text in PLANT.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    table = {"toy": Assignment("toy", "t", (Part("f", "mod.py", "f", 5, "x"),
                                            Part("h", "mod.py", "g", 5, "y")))}
    defects = check(["toy"], root=tmp_path, assignments=table, say=lambda s: None)
    assert any("test_f_exists passed on the stubs" in d for d in defects), defects
    assert any("test_g_is_one failed on the reference" in d for d in defects), defects
    assert any("test_g_is_one belongs to no part" in d for d in defects), defects
    assert any("the part h has no graded test" in d for d in defects), defects
    assert not any("test_f_doubles" in d for d in defects), defects
    # the test of g fails on the stubs with the stub's error, so it is not named for that
    assert not any("not with the stub's" in d for d in defects), defects


# ------------------------------------------------------------------------- the real assignments
def test_check_passes_for_all_six():
    assert set(ASSIGNMENTS) == {"core", "gog", "lras", "am3safety", "cot_causal", "prm_bench"}
    assert check(say=lambda s: None) == []
