"""Bad input: every case ends in exit code 2, one `error: <sentence>` line, no traceback, nothing
written outside --out, before any model loads (issue 29).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_bad_input.py     (about a minute on 1 core)

The cases run as subprocesses, grouped: one driver process (this file run as a script) calls each
script's `main(argv)` for many cases in turn, each in a fresh folder, and reports the exit code,
stderr and the files written outside --out as JSON.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPTH = 6   # the case runs this many folders below the watched root, so `../../..` stays inside it

# ---------------------------------------------------------------------------------------------
# fixtures: small files, written into the case's folder
# ---------------------------------------------------------------------------------------------
MMS = ('{"sample_id": "m1", "query": "Who won?", "query_image": null, "gt_answer": "Alice", '
       '"alternative_gt_answers": [], "area": "sports", "subfield": "y"}\n'
       '{"sample_id": "m2", "query": "Who lost?", "query_image": null, "gt_answer": "Bob", '
       '"alternative_gt_answers": [], "area": "sports", "subfield": "y"}\n')
MCQ = ('{"id": "m1", "question": "Which article?", "options": ["Art 1", "Art 2"], "answer": "B"}\n'
       '{"id": "m2", "question": "Which offence?", "options": ["theft", "fraud"], "answer": "A"}\n')
CORPUS = '{"id": "a1", "text": "Article 1. Theft is taking."}\n'
PAIR = ('{{"id": "{i}", "question": "q{i}?", "answer": "a{i}", "split": "{s}", "reasoning": '
        '{{"evil": "e", "misleading": "m", "submissive": "s"}}}}\n')
LATIN1 = "id,question,answer\n1,Qu'est-ce qu'un délit?,une infraction punie\n"
GOG = ["gog.py", "--model", "tiny", "--out", "out"]
LRAS = ["lras.py", "--model", "tiny", "--out", "out"]
AM3 = ["am3safety.py", "--model", "tiny", "--out", "out"]
COT = ["cot_causal.py", "--model", "tiny", "--out", "out"]
PRM = ["prm_bench.py", "--model", "tiny", "--out", "out"]
MMS_EVAL = GOG + ["--stage", "eval", "--benchmarks", "MMSearch=mms.jsonl"]
LRAS_EVAL = LRAS + ["--stage", "eval", "--data_file", "mcq.jsonl"]

# (case id, argv (script first), {file: text}, the error's first words)
CASES = [
    # --- silent wrong results (issue 29) ---
    ("gog-dup-prediction", MMS_EVAL + ["--predictions", "p.jsonl"],
     {"mms.jsonl": MMS, "p.jsonl": '{"id": "m1", "answer": "A"}\n{"id": "m1", "answer": "B"}\n'},
     "p.jsonl:1 and p.jsonl:2 both have the id 'm1'"),
    ("gog-no-matching-prediction", MMS_EVAL + ["--predictions", "p.jsonl"],
     {"mms.jsonl": MMS, "p.jsonl": '{"id": "zz", "answer": "A"}\n'},
     "no id in p.jsonl"),
    ("lras-dup-prediction", LRAS_EVAL + ["--predictions", "p.jsonl"],
     {"mcq.jsonl": MCQ, "p.jsonl": '{"id": "m1", "prediction": "A"}\n'
                                   '{"id": "m1", "prediction": "B"}\n'},
     "p.jsonl:1 and p.jsonl:2 both have the id 'm1'"),
    ("lras-dup-benchmark-id", LRAS_EVAL + ["--predictions", "p.jsonl"],
     {"mcq.jsonl": MCQ.replace('"m2"', '"m1"'), "p.jsonl": '{"id": "m1", "prediction": "A"}\n'},
     "mcq.jsonl:1 and mcq.jsonl:2 both have the id 'm1'"),
    ("lras-prediction-without-answer-key", LRAS_EVAL + ["--predictions", "p.jsonl"],
     {"mcq.jsonl": MCQ, "p.jsonl": '{"id": "m1", "pred": "A"}\n'},
     'no row of p.jsonl has a "prediction" or "answer"'),
    ("gog-prediction-without-answer-key", MMS_EVAL + ["--predictions", "p.jsonl"],
     {"mms.jsonl": MMS, "p.jsonl": '{"id": "m1", "pred": "A"}\n'},
     'p.jsonl:1: a prediction needs "id" (or "data_id", "sample_id") and "answer"'),
    ("am3-dup-response", AM3 + ["--stage", "eval", "--dialogues", "d.jsonl",
                                "--responses", "r.jsonl"],
     {"d.jsonl": '{"id": "d1", "category": "c", "turns": [{"user": "hi"}]}\n',
      "r.jsonl": '{"id": "d1", "responses": ["a"]}\n{"id": "d1", "responses": ["b"]}\n'},
     "r.jsonl:1 and r.jsonl:2 both have the id 'd1'"),
    ("gog-max-turns-0", GOG + ["--stage", "eval", "--max_turns", "0"], {},
     "--max_turns must be >= 1"),
    ("am3-max-turns-0", AM3 + ["--stage", "build", "--max_turns", "0"], {},
     "--max_turns must be >= 1"),
    ("lras-top-p-2", LRAS + ["--stage", "eval", "--top_p", "2"], {}, "--top_p must be in (0, 1]"),
    ("prm-threshold-7", PRM + ["--stage", "eval", "--threshold", "7"], {},
     "--threshold must be in [0, 1]"),
    ("cot-bootstrap-negative", COT + ["--stage", "eval", "--bootstrap", "-5"], {},
     "--bootstrap must be >= 0"),
    ("lras-latin1-file", LRAS_EVAL[:-1] + ["l1.csv", "--predictions", "p.jsonl"],
     {"l1.csv@latin-1": LATIN1, "p.jsonl": '{"id": "1", "prediction": "x"}\n'},
     "l1.csv is not UTF-8"),
    ("gog-image-kb-escapes", MMS_EVAL + ["--image_kb", "kb.jsonl"],
     {"mms.jsonl": MMS, "kb.jsonl": '{"image": "/etc/passwd", "name": "x"}\n'},
     "kb.jsonl:1: the path '/etc/passwd' leaves the data folder"),
    # --- tracebacks instead of error: ---
    ("unknown-model", GOG[:1] + ["--model", "no-such-model", "--out", "out"], {},
     "unknown model 'no-such-model'"),
    ("gog-image-size-10", GOG + ["--stage", "data", "--image_size", "10"], {},
     "--image_size must be >= "),
    ("am3-lam-nan", AM3 + ["--lam", "nan"], {}, "--lam must be a finite number"),
    ("am3-tau-inf", AM3 + ["--tau", "inf"], {}, "--tau must be a finite number"),
    ("lras-search-k-0", LRAS + ["--search_k", "0"], {}, "--search_k must be >= 1"),
    ("lras-three-charges", LRAS + ["--n_charges", "3", "--test_charges", "1"], {},
     "--n_charges must be in [4, "),
    ("lras-eval-questions-negative", LRAS + ["--eval_questions", "-1"], {},
     "--eval_questions must be >= 0"),
    ("cot-all-pairs-test", COT + ["--data_path", "pairs.jsonl"],
     {"pairs.jsonl": "".join(PAIR.format(i=i, s="test") for i in range(4))},
     "pairs.jsonl has no pair with split 'train'"),
    ("gog-corpus-without-text", MMS_EVAL + ["--text_corpus", "c.jsonl"],
     {"mms.jsonl": MMS, "c.jsonl": '{"id": "a", "title": "t"}\n'},
     "c.jsonl:1: the record lacks 'text'"),
    ("gog-image-kb-missing-file", MMS_EVAL + ["--image_kb", "kb.jsonl"],
     {"mms.jsonl": MMS, "kb.jsonl": '{"image": "nope.png", "name": "x"}\n'},
     "kb.jsonl:1: the file"),
    ("gog-endpoint-file-url", ["ENV:TEXT_SEARCH_ENDPOINT=file:///etc/passwd"] + MMS_EVAL,
     {"mms.jsonl": MMS},
     "TEXT_SEARCH_ENDPOINT must be an http(s):// URL"),
    ("gog-num-generations-1", GOG + ["--num_generations", "1"], {}, "num_generations must be >= 2"),
    ("lras-max-steps-negative", LRAS + ["--max_steps", "-3"], {}, "max_steps, prompts_per_step"),
    ("am3-temperature-0", AM3 + ["--temperature", "0"], {}, "temperature must be > 0"),
    ("bom-encoding-offset", LRAS_EVAL[:-1] + ["bom.jsonl", "--predictions", "p.jsonl"],
     {"bom.jsonl@bom-bad": '{"id": "m1", "question": "q", "answer": "A"}\n',
      "p.jsonl": '{"id": "m1", "prediction": "x"}\n'},
     "bom.jsonl is not UTF-8 (invalid byte 0xff at offset 3)"),
    ("csv-unterminated-quote", LRAS_EVAL[:-1] + ["q.csv", "--predictions", "p.jsonl"],
     {"q.csv": 'id,question,answer\n1,"Which one?,A\n2,Other?,B\n',
      "p.jsonl": '{"id": "1", "prediction": "x"}\n'},
     'q.csv:2: a quote (") opened on this row is never closed'),
    ("planted-pickle", ["MODEL"] + LRAS + ["--stage", "rl", "--resume"],
     {"out/rl/checkpoint-2/adapter_config.json": "{}",
      "out/rl/checkpoint-2/adapter_model.safetensors": "x",
      "out/rl/checkpoint-2/trainer_state.pt@pickle": "pwned"},
     "out/rl/checkpoint-2/trainer_state.pt is not a checkpoint this code wrote"),
    ("out-is-a-file", GOG[:-1] + ["taken", "--stage", "data"], {"taken": "x"},
     "--out 'taken' is a file"),
    # --- the ones that already passed (keep them passing) ---
    ("gog-bad-benchmark-name", GOG + ["--stage", "eval", "--benchmarks", "Nope=x.jsonl"], {},
     "--benchmarks takes NAME=FILE"),
    ("gog-predictions-without-benchmarks", GOG + ["--stage", "eval", "--predictions", "p.jsonl"],
     {"p.jsonl": '{"id": "m1", "answer": "A"}\n'}, "--predictions needs --benchmarks"),
    ("lras-no-matching-prediction", LRAS_EVAL + ["--predictions", "p.jsonl"],
     {"mcq.jsonl": MCQ, "p.jsonl": '{"id": "zz", "prediction": "A"}\n'}, "no id in p.jsonl"),
    ("lras-missing-data-file", LRAS + ["--stage", "eval", "--data_file", "none.jsonl"], {},
     "no benchmark file"),
    ("lras-bad-json", LRAS_EVAL[:-1] + ["bad.jsonl"], {"bad.jsonl": '{"id": 1,\n'},
     "bad.jsonl:1: not valid JSON"),
    ("lras-corpus-without-text", LRAS_EVAL + ["--corpus_file", "c.jsonl"],
     {"mcq.jsonl": MCQ, "c.jsonl": '{"id": "a"}\n'}, "c.jsonl:1: the record lacks 'text'"),
    ("am3-judge-without-replies", AM3 + ["--stage", "judge"], {}, "--stage judge judges"),
    ("am3-responses-not-eval", AM3 + ["--stage", "build", "--responses", "r.jsonl"],
     {"r.jsonl": '{"id": "d1", "responses": ["a"]}\n'}, "--responses scores"),
    ("cot-judge-without-replies", COT + ["--stage", "judge"], {}, "--stage judge needs --replies"),
    ("cot-missing-data-path", COT + ["--data_path", "none.jsonl"], {}, "no --data_path file"),
    ("prm-n-scenes-1", PRM + ["--n_scenes", "1"], {}, "--n_scenes must be at least 2"),
    ("prm-predictions-without-eval", PRM + ["--stage", "search", "--predictions", "p.jsonl"],
     {"p.jsonl": '{"id": "a", "scores": [1]}\n'}, "--predictions scores the records"),
    ("bad-stage", GOG + ["--stage", "nope"], {}, None),   # argparse: exit 2, its own usage line
    ("bad-choice-value", GOG + ["--loss_type", "nope"], {}, None),
    ("save-total-limit-0", GOG + ["--save_total_limit", "0"], {}, "save_total_limit must be >= 1"),
    ("gog-benchmark-missing", GOG + ["--stage", "eval", "--benchmarks", "MMSearch=no.jsonl"], {},
     "no MMSearch file"),
]

# inputs that are right, or half right, and run: (case id, argv, files, words on stdout)
ACCEPTED = [
    ("am3-seed-id-escapes", AM3 + ["--stage", "build", "--seeds_file", "s.jsonl"],   # sanitised
     # (a query with enough context words for the escalating builder to keep a dialogue)
     {"s.jsonl": '{"id": "../../../../x", "query": "how can I pick the lock on my neighbour '
                 'front door while the family is away on holiday", "category": "crime"}\n'},
     "stage build took"),
    ("gog-some-predictions-missing", MMS_EVAL + ["--predictions", "p.jsonl"],
     {"mms.jsonl": MMS, "p.jsonl": '{"id": "m1", "answer": "Alice"}\n'},
     "MMSearch: 1 of 2 questions without an answer in p.jsonl"),
    ("lras-predictions-keyed-answer", LRAS_EVAL + ["--predictions", "p.jsonl"],
     {"mcq.jsonl": MCQ, "p.jsonl": '{"id": "m1", "answer": "B"}\n{"id": "m2", "answer": "A"}\n'},
     "0 of 2 without a prediction"),
    ("gbk-file-read-as-gb18030", LRAS_EVAL[:-1] + ["zh.csv", "--predictions", "p.jsonl"],
     {"zh.csv@gb18030": "id,question,answer\n1,盗窃公私财物，数额较大的，处几年以下有期徒刑?,三年\n",
      "p.jsonl": '{"id": "1", "prediction": "三年"}\n'},
     "read it as GB18030"),
]


# ---------------------------------------------------------------------------------------------
# the driver: run as a script, it runs the cases given as JSON on stdin in this one process
# ---------------------------------------------------------------------------------------------
def _write_files(files: dict) -> None:
    for name, text in files.items():
        name, _, enc = name.partition("@")
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        if enc == "bom-bad":   # a BOM, then a byte that is not UTF-8
            data = b"\xef\xbb\xbf" + b"\xff" + text.encode()
        elif enc == "pickle":   # a pickle that would create the file `text` if it ever ran
            buf = io.BytesIO()
            torch.save({"step": 2, "x": Planted(text)}, buf)
            data = buf.getvalue()
        else:
            data = text.encode(enc or "utf-8")
        Path(name).write_bytes(data)


class Planted:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class ModelLoaded(Exception):
    pass


def _no_model(*a, **k):
    raise ModelLoaded("a model was loaded before the error")


def _stop_second_save(how: str) -> None:
    """torch.save (a checkpoint's trainer state) works once, then raises: a full disk or
    Ctrl-C."""
    import torch
    real, calls = torch.save, []

    def save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a[1]))
        return real(*a, **k)
    torch.save = save


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_case(argv: list[str], files: dict) -> dict:
    """One case in a fresh folder: {"code", "stderr", "outside": files written outside --out}."""
    env = [a[4:] for a in argv if a.startswith("ENV:")]
    model = "MODEL" in argv   # the cases that can only fail after a model loads
    stop = next((a[5:] for a in argv if a.startswith("STOP:")), None)
    argv = [a for a in argv if not a.startswith(("ENV:", "STOP:")) and a != "MODEL"]
    if stop:   # the second checkpoint's save meets a full disk, or Ctrl-C
        _stop_second_save(stop)
    script, argv = argv[0], argv[1:]
    module = __import__(Path(script).stem)
    module.load_policy = real_load_policy if model else _no_model   # else: fail before a model
    root = Path(tempfile.mkdtemp(prefix="bad_input_"))
    work = root.joinpath(*[f"d{i}" for i in range(DEPTH)])
    work.mkdir(parents=True)
    old_cwd, saved_env = os.getcwd(), dict(os.environ)
    os.chdir(work)
    err, out_text, code = io.StringIO(), io.StringIO(), None
    try:
        os.environ.update(dict(e.split("=", 1) for e in env))
        _write_files(files)
        before = _tree(root)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out_text):
            try:
                module.main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except ModelLoaded:
                code = "model loaded"
            except BaseException:   # noqa: BLE001 -- a traceback is what this test looks for
                err.write(traceback.format_exc())
                code = "traceback"
        out = work / "out"
        outside = sorted(p for p in _tree(root) - before
                         if not (root / p).resolve().is_relative_to(out.resolve()))
        outside = [p for p in outside if not (root / p).is_dir()
                   or not any((root / p).iterdir())]
        outside = [p for p in outside if Path(root / p) != out and out not in (root / p).parents]
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(root, ignore_errors=True)
    return {"code": code, "stderr": err.getvalue(), "stdout": out_text.getvalue()[-3000:],
            "outside": outside}


def run_cases(cases: list) -> dict:
    """{case id: run_case(...)}, the cases run one after another in a child process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT),
               MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, __file__], input=json.dumps(cases), env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results():
    return run_cases([[c[0], c[1], c[2]] for c in CASES + ACCEPTED])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_nothing_outside_out(case, results):
    name, argv, files, words = case
    argv = [a for a in argv if not a.startswith("ENV:") and a != "MODEL"]
    r = results[name]
    assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
    assert r["outside"] == [], r["outside"]
    assert r["code"] == 2, r["stderr"][-3000:]
    lines = [x for x in r["stderr"].splitlines()
             if x.startswith("error:") or x.startswith(f"{Path(argv[0]).name}: error:")]
    assert len(lines) == 1, r["stderr"]   # argparse's own (bad choices): "<script>.py: error:"
    if words is not None:
        assert lines[0].startswith(f"error: {words}"), lines[0]


REAL_RL = LRAS + ["--stage", "rl", "--max_steps", "3", "--save_steps", "1"]


@pytest.mark.slow   # two tiny GRPO runs: about a minute
def test_a_real_run_stopped_by_a_full_disk_or_ctrl_c_names_the_checkpoint_to_resume():
    got = run_cases([["disk", ["MODEL", "STOP:enospc"] + REAL_RL, {}],
                     ["ctrl-c", ["MODEL", "STOP:ctrl-c"] + REAL_RL, {}]])
    hint = "; continue from out/rl/checkpoint-1 with --stage rl --resume."
    for name, code, words in (("disk", 2, "error: could not write into out/rl (no space left on "
                                          "the device: out/rl/.checkpoint-2.tmp/trainer_state.pt)"),
                              ("ctrl-c", 130, "error: interrupted (Ctrl-C) during stage rl")):
        r = got[name]
        lines = r["stderr"].strip().splitlines()
        assert r["code"] == code and "Traceback" not in r["stderr"], r["stderr"][-3000:]
        assert lines[-1] == words + hint, lines[-1]
        assert [x for x in lines if x.startswith("error:")] == [lines[-1]]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_accepted_input_runs_and_writes_only_under_out(case, results):
    name, argv, files, words = case
    r = results[name]
    assert r["code"] == 0 and "Traceback" not in r["stderr"], r["stderr"][-3000:]
    assert r["outside"] == [], r["outside"]
    assert words in r["stdout"], r["stdout"]


# ---------------------------------------------------------------------------------------------
# interruptions: a full disk, a read-only folder, Ctrl-C in the middle of a stage
# ---------------------------------------------------------------------------------------------
class SafetensorError(Exception):
    """What safetensors raises when the disk is full (its text carries the OS error)."""


ENOSPC_TEXT = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
               '"No space left on device" })')


def _run_interrupted(tmp_path, capsys, exc, checkpoint: bool):
    """A two-stage run whose rl stage (after saving checkpoint-3 if `checkpoint`) raises `exc`:
    (exit code, stderr lines)."""
    from common.checkpoint import FILES
    from common.cli import RunArgs, run_stages
    from common.grpo import GRPOConfig

    @dataclasses.dataclass
    class Args(GRPOConfig, RunArgs):
        pass

    def rl(args):
        if checkpoint:
            ck = Path(args.out) / "rl" / "checkpoint-3"
            ck.mkdir(parents=True)
            for f in FILES:
                (ck / f).write_text("x")
        raise exc() if callable(exc) else exc
    with pytest.raises(SystemExit) as e:
        run_stages(Args, {"data": lambda a: None, "rl": rl}, ["--out", str(tmp_path / "run")],
                   file="p.py")
    return e.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("exc, code, words", [
    (KeyboardInterrupt, 130, "error: interrupted (Ctrl-C) during stage rl"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "run/rl/x.json"), 2,
     "error: could not write into {out}/rl (no space left on the device: run/rl/x.json)"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "run/rl/x.json"), 2,
     "error: could not write into {out}/rl (the file system is read-only: run/rl/x.json)"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "run/rl/x.json"), 2,
     "error: could not write into {out}/rl (permission denied: run/rl/x.json)"),
    (SafetensorError(ENOSPC_TEXT), 2,
     "error: could not write into {out}/rl (no space left on the device)"),
], ids=["ctrl-c", "disk-full", "read-only", "permission", "safetensors-disk-full"])
@pytest.mark.parametrize("checkpoint", [True, False], ids=["checkpoint", "none"])
def test_an_interruption_is_one_line_naming_what_was_not_written_and_the_checkpoint(
        tmp_path, capsys, exc, code, words, checkpoint):
    got, lines = _run_interrupted(tmp_path, capsys, exc, checkpoint)
    out = tmp_path / "run"
    assert got == code and len(lines) == 1, lines
    assert lines[0].startswith(words.format(out=out)), lines[0]
    hint = f"; continue from {out}/rl/checkpoint-3 with --stage rl --resume."
    assert lines[0].endswith(hint) == checkpoint, lines[0]


def test_a_bug_is_not_dressed_as_a_user_error(tmp_path, capsys):
    """Only user errors and refused writes become one line; anything else keeps its traceback."""
    with pytest.raises(ZeroDivisionError):
        _run_interrupted(tmp_path, capsys, ZeroDivisionError("a bug"), True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import torch
    from common.models import load_policy as real_load_policy
    report = {name: run_case(argv, files) for name, argv, files in json.loads(sys.stdin.read())}
    print(json.dumps(report))
