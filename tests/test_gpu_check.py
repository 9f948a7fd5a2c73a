# Run: pytest tests/test_gpu_check.py -q      (CPU, ~1 minute under shared load;
#      the real-width CPU smoke: pytest -m slow tests/test_gpu_check.py, 3-8 minutes)
"""The prepared GPU check cannot rot: its dry run lists every step, the GPU plan's every command
line parses with the script it calls, its CI smoke runs every step end to end on the tiny preset
(pytest collecting the CUDA tests, a bench step, gog --stage all) and writes the summary, its
pytest judge fails skipped CUDA tests, and its budget judge fails a peak over budget or a missing
figure."""
import json
import os
import subprocess

import pytest

from common.perf import gpu_check
from common.perf.gpu_check import BUDGET_GB, Args, install_command, judge, plan, pytest_counts
from helpers import ROOT

SH = os.path.join(ROOT, "tests", "gpu_check.sh")


def run_sh(*argv, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([SH, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_lists_every_step(tmp_path):
    out = run_sh(str(tmp_path / "g"), "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    cmds = out.stdout
    assert "pytest -m gpu" in cmds and "--vs-trl" in cmds and "gog.py --stage all" in cmds
    assert "--save_model" in cmds and "qwen2.5-vl-7b" in cmds
    for flag in ("--load_in_4bit", "--gradient_checkpointing", "--image_size 448",
                 "--max_new_tokens 512",
                 "--num_generations 8", "--max_steps 2"):
        assert flag in cmds, flag
    assert not (tmp_path / "g").exists()          # a dry run writes nothing
    assert "On the GPU box" in cmds and "bench_3b_peak <= 12 GB, bench_7b_peak <= 16 GB" in cmds


def test_every_gpu_command_parses_with_its_script(tmp_path):
    """The CI smoke runs the steps at toy size; the GPU plan's own flags (--random-weights,
    --save_model, --load_in_4bit, --vs-trl, gog's sizes) are checked here against the parsers of
    the scripts they call."""
    import gog
    from common.perf import bench
    from common.cli import parse_args
    steps = plan(Args(out=str(tmp_path / "g"), work=str(tmp_path / "m")))
    assert [s["name"] for s in steps] == ["pytest_gpu", "build_3b", "bench_3b", "bench_3b_text",
                                          "build_7b", "bench_7b", "gog_3b"]
    for s in steps[1:]:
        argv = s["cmd"][3:]
        if s["name"].startswith("gog"):
            script_argv = argv[argv.index("--") + 2:]
            a = parse_args(gog.Args, script_argv)
            assert a.stage == "all" and a.load_in_4bit in (True, "true") and a.max_steps == 2
        else:
            a = parse_args(bench.Args, argv)
            assert a.save_model or (a.load_in_4bit and a.gradient_checkpointing
                                    and a.num_generations == 8 and a.max_new_tokens == 512
                                    and a.beta == 0.04)


def test_pytest_judge_counts_skips_as_failures():
    """pytest's own summary lines: on the GPU box a skipped CUDA test fails the check."""
    assert pytest_counts("..\n9 tests collected in 5.30s\n")["collected"] == 9
    c = pytest_counts("x\n7 passed, 2 skipped, 1 deselected in 41.20s\n")
    assert (c["passed"], c["skipped"], c["deselected"]) == (7, 2, 1)
    c = pytest_counts("1 failed, 8 passed, 1 error in 3.1s")
    assert (c["failed"], c["passed"], c["error"]) == (1, 8, 1)
    log = gpu_check.Log(None)
    ok = gpu_check.run_step({"name": "pytest_gpu",
                             "cmd": ["python", "-c", "print('9 passed in 1.0s')"]}, log, 60)
    skip = gpu_check.run_step({"name": "pytest_gpu",
                               "cmd": ["python", "-c", "print('9 skipped in 1.0s')"]}, log, 60)
    none = gpu_check.run_step({"name": "pytest_gpu",
                               "cmd": ["python", "-c", "print('no tests ran'); exit(5)"]},
                              log, 60)
    assert ok["rc"] == 0 and skip["rc"] == 1 and "skipped" in skip["error"] and none["rc"] == 5


def test_ci_smoke_runs_every_step(tmp_path, monkeypatch):
    """The whole check at toy size, in CI: pytest collects the CUDA tests, the bench runs one
    GRPO step on the tiny preset with an image, gog runs every stage on tiny; summary.json, the
    log and the budgets."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out_dir = tmp_path / "g"
    rc = gpu_check.main([str(out_dir), "--ci-smoke", "--work", str(tmp_path / "models")])
    summary = json.loads((out_dir / "summary.json").read_text())
    log = (out_dir / "gpu_check.log").read_text()
    failed = {k: v.get("error") for k, v in summary["steps"].items() if v["rc"] != 0}
    assert not failed and rc == 0 and summary["pass"], (failed, log[-3000:])
    assert list(summary["steps"]) == ["pytest_gpu", "bench_tiny", "gog_tiny"]
    # the CUDA tests import and are found
    assert summary["steps"]["pytest_gpu"]["counts"]["collected"] >= 8
    bench = summary["steps"]["bench_tiny"]["result"]
    assert bench["ours"]["gen_tokens"] == 2 * 2 and bench["ours"]["peak_gb"] > 0
    line = next(ln for ln in log.splitlines() if ln.startswith("[gpu_check] ok   bench_tiny"))
    # the summary line says it too
    assert 0 < bench["limits"]["decode_fraction"] and "of the bandwidth bound" in line, line
    assert summary["steps"]["gog_tiny"]["result"]["peak_gb"] > 0
    assert ((out_dir / "gog_tiny" / "rl").is_dir()
            and (out_dir / "gog_tiny" / "eval" / "results.json").exists())
    assert (summary["budgets"]["bench_tiny_peak"]["pass"]
            and summary["budgets"]["gog_tiny_peak"]["pass"])
    assert summary["versions"]["torch"] and "device" in summary["versions"]
    assert "===== summary =====" in log and "ALL PASS" in log


def test_budget_judge_fails_over_budget_and_missing():
    res = {"bench_3b": {"rc": 0, "result": {"ours": {"peak_gb": 11.9}}},
           "bench_7b": {"rc": 0, "result": {"ours": {"peak_gb": 16.2}}},
           "gog_3b": {"rc": 1}}
    j = judge(res, Args())
    assert j["bench_3b_peak"]["pass"] and not j["bench_7b_peak"]["pass"]
    assert j["gog_3b_peak"]["value_gb"] is None and not j["gog_3b_peak"]["pass"]
    assert BUDGET_GB == {"3b": 12.0, "7b": 16.0}


def test_wheels_only_from_the_local_folder(tmp_path):
    assert install_command(["trl"], str(tmp_path / "none")) is None   # no folder: never pip
    cmd = install_command(["trl", "bitsandbytes"], str(tmp_path))
    assert "--no-index" in cmd and cmd[cmd.index("--find-links") + 1] == str(tmp_path)
    assert install_command([], str(tmp_path)) is None


# 3-8 minutes on the shared 2-core box (a 1-layer 2048-wide model, TRL, gog): not CI-sized
@pytest.mark.slow
def test_cpu_smoke_runs_every_step(tmp_path):
    """The whole check on a CPU: build + bench (with TRL) on a random 1-layer 3B with a 1k
    vocabulary, gog on the tiny preset; summary.json and the log land in the folder."""
    out_dir, work = tmp_path / "g", tmp_path / "models"
    out = run_sh(str(out_dir), "--cpu-smoke", "--work", str(work), timeout=900)
    summary = json.loads((out_dir / "summary.json").read_text())
    log = (out_dir / "gpu_check.log").read_text()
    failed = {k: v.get("error") for k, v in summary["steps"].items() if v["rc"] != 0}
    assert not failed, (failed, log[-3000:])
    assert {"build_3b", "bench_3b", "gog_tiny"} <= set(summary["steps"])
    bench = summary["steps"]["bench_3b"]["result"]
    assert bench["ours"]["gen_tokens"] == 2 * 4 and bench["ours"]["peak_gb"] > 0
    # no torchvision: text only
    trl = bench if "trl" in bench else summary["steps"]["bench_3b_text"]["result"]
    assert trl["trl_tokens_equal"] and trl["trl"]["peak_gb"] > 0 and trl["trl_over_ours"] > 0
    assert summary["steps"]["gog_tiny"]["result"]["peak_gb"] > 0
    assert summary["versions"]["torch"] and "device" in summary["versions"]
    assert "bench_3b_peak" in summary["budgets"] and out.returncode == (0 if summary["pass"] else 1)
    assert "===== summary =====" in log
