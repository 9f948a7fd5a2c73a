# Run: pytest tests/test_gpu_check.py -q      (CPU, seconds; the full CPU smoke: pytest -m slow tests/test_gpu_check.py)
"""The prepared GPU check cannot rot: its dry run lists every step, its CPU smoke runs every step
end to end (random 1-layer Qwen2.5-VL-3B, tiny image, 4 tokens, no 4-bit) and writes the summary,
and its budget judge fails a peak over budget or a missing figure."""
import json
import os
import subprocess

import pytest

from common.gpu_check import BUDGET_GB, install_command, judge, plan, Args
from helpers import ROOT

SH = os.path.join(ROOT, "tests", "gpu_check.sh")


def run_sh(*argv, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([SH, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_every_step(tmp_path):
    out = run_sh(str(tmp_path / "g"), "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    cmds = out.stdout
    assert "pytest -m gpu" in cmds and "--vs-trl" in cmds and "gog.py --stage all" in cmds
    assert "--save_model" in cmds and "qwen2.5-vl-7b" in cmds
    for flag in ("--load_in_4bit", "--gradient_checkpointing", "--image_size 448", "--max_new_tokens 512",
                 "--num_generations 8", "--max_steps 2"):
        assert flag in cmds, flag
    assert not (tmp_path / "g").exists()          # a dry run writes nothing


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


@pytest.mark.slow   # ~8 minutes on the shared 2-core box (a 1-layer 2048-wide model, TRL, gog): not CI-sized
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
    trl = bench if "trl" in bench else summary["steps"]["bench_3b_text"]["result"]  # no torchvision: text only
    assert trl["trl_tokens_equal"] and trl["trl"]["peak_gb"] > 0 and trl["trl_over_ours"] > 0
    assert summary["steps"]["gog_tiny"]["result"]["peak_gb"] > 0
    assert summary["versions"]["torch"] and "device" in summary["versions"]
    assert "bench_3b_peak" in summary["budgets"] and out.returncode == (0 if summary["pass"] else 1)
    assert "===== summary =====" in log
