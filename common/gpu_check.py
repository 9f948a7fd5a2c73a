"""The prepared GPU check: one command that proves the consumer-GPU promise on one CUDA GPU, offline.

    tests/gpu_check.sh runs/gpu_check                 # on the GPU box: ~8 minutes on one H100/H200
    tests/gpu_check.sh runs/gpu_check --dry-run       # print the commands it would run, run nothing
    tests/gpu_check.sh runs/gpu_check --cpu-smoke     # the same plumbing on a CPU in under a minute

What it does, in order, writing everything into the folder given (`summary.json`, `gpu_check.log`,
one sub-folder per step):
  1. packages: uses the Python that is there; installs a missing bitsandbytes / trl / peft from
     a local `.whl/` folder of wheels (`pip install --no-index --find-links .whl`), never from the
     network; records the versions it ran with (python, torch, CUDA, transformers, peft,
     bitsandbytes, trl, the GPU and its memory).
  2. `pytest -m gpu`: the CUDA tests (tests/test_gpu.py).
  3. `common.bench` on random-weight Qwen2.5-VL-3B and -7B built from the published configs, NF4 +
     LoRA + gradient checkpointing, G = 8, one 448x448 image, 512 new tokens: peak allocated
     memory, step time split, generated tokens/s and its fraction of the HBM-bandwidth bound, and
     TRL's step time on 3B side by side (each side in its own process).
  4. `gog.py --stage all` on the random 3B for 2 RL steps (real-size plumbing: image tokens,
     crops, 4-bit training) with its peak memory.
  5. Budgets, printed as PASS/FAIL and stored in summary.json: 3B peak <= 12 GB, 7B peak <= 16 GB
     (the README's consumer-GPU promise; T4 class for 7B). Exit status 0 only when every step ran
     and every budget holds.

Random weights: the numbers are sizes and speeds of the real architectures; the text is noise.
The random models are written once to --work (default /tmp/gpu_check_models: 3B ~7.5 GB, 7B ~17 GB
in bf16), outside the output folder, so the folder stays small enough to copy back.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_GB = {"3b": 12.0, "7b": 16.0}   # peak allocated GPU memory per GRPO step (DESIGN.md budgets)
OPTIONAL = {"bitsandbytes": "bitsandbytes", "trl": "trl", "peft": "peft"}  # import name -> wheel name


@dataclass
class Args:
    out: str = "runs/gpu_check"
    """folder for summary.json, gpu_check.log and each step's output (the first positional argument)"""
    dry_run: bool = False
    """print the commands it would run, run nothing"""
    cpu_smoke: bool = False
    """the CI smoke on a CPU: 1 layer, 1k vocab, 56 px image, 4 tokens, G = 2, no 4-bit, 1 step each"""
    wheels: str = ".whl"
    """folder of local wheels for missing packages (never the network)"""
    work: str = "/tmp/gpu_check_models"
    """where the random-weight models are written (large; not copied back with the output)"""
    sizes: str = "3b,7b"
    """which random-weight Qwen2.5-VL sizes to bench"""
    num_layers: int = 0
    """keep this many LLM and ViT blocks (0 = the published depth)"""
    vocab_size: int = 0
    """shrink the random models' vocabulary to this (0 = the published 151,936 / 152,064)"""
    num_generations: int = 8
    """G"""
    image_size: int = 448
    """side of the prompt's image"""
    max_new_tokens: int = 512
    """tokens per completion (forced length)"""
    steps: int = 2
    """measured bench steps per side"""
    warmup: int = 1
    """unmeasured bench steps per side"""
    load_in_4bit: bool = True
    """NF4 base weights"""
    gradient_checkpointing: bool = True
    """activation checkpointing"""
    trl: bool = True
    """run TRL beside ours on the first size"""
    gog_steps: int = 2
    """RL steps of gog.py --stage all on the random 3B (0 = skip)"""
    gog_model: str = ""
    """model for the gog run (default: the random first size; the CPU smoke uses tiny, since gog's
    every stage on even a 1-layer 3B takes over 10 minutes on 2 CPU cores)"""
    pytest: bool = True
    """run pytest -m gpu"""
    timeout: int = 900
    """seconds per command before it is killed and counted as failed"""


CPU_SMOKE = dict(num_layers=1, vocab_size=1024, num_generations=2, image_size=56, max_new_tokens=4,
                 steps=1, warmup=0, load_in_4bit=False, gradient_checkpointing=True, sizes="3b", gog_steps=1,
                 gog_model="tiny", pytest=False)


class Log:
    """Print and append to <out>/gpu_check.log."""

    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


# ---------------------------------------------------------------------------------------------
# 1. packages
# ---------------------------------------------------------------------------------------------
def version_of(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as e:  # a package that is there but does not import (e.g. no CUDA libs)
        return f"broken ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


def install_command(missing: list[str], wheels: str) -> list[str] | None:
    """pip from the local wheel folder only (--no-index): None when there is no such folder."""
    if not missing or not os.path.isdir(wheels):
        return None
    return [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, *missing]


def versions() -> dict:
    import torch
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for mod in ("transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets", "torchvision"):
        v[mod] = version_of(mod)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        v.update(device=p.name, device_memory_gb=round(p.total_memory / 2**30, 1),
                 capability=f"{p.major}.{p.minor}")
    else:
        v["device"] = f"CPU ({os.cpu_count()} cores)"
    return v


# ---------------------------------------------------------------------------------------------
# the plan: every command, so --dry-run can print it
# ---------------------------------------------------------------------------------------------
def random_model_dir(args, size: str) -> str:
    tag = f"{size}-L{args.num_layers or 'all'}-V{args.vocab_size or 'full'}"
    return os.path.join(args.work, f"qwen25vl-{tag}")


def plan(args) -> list[dict]:
    py = sys.executable
    steps = []
    if args.pytest:
        steps.append(dict(name="pytest_gpu", cmd=[py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                                  os.path.join(ROOT, "tests")]))
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    for i, size in enumerate(sizes):
        folder = random_model_dir(args, size)
        build = [py, "-m", "common.bench", "--model", f"qwen2.5-vl-{size}", "--random-weights",
                 "--num_layers", str(args.num_layers), "--vocab_size", str(args.vocab_size), "--save_model", folder]
        steps.append(dict(name=f"build_{size}", cmd=build, skip_if_exists=os.path.join(folder, "config.json")))
        bench = [py, "-m", "common.bench", "--model", folder, "--num_generations", str(args.num_generations),
                 "--image_size", str(args.image_size), "--max_new_tokens", str(args.max_new_tokens),
                 "--prompt_tokens", "64", "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--beta", "0.04", "--load_in_4bit" if args.load_in_4bit else "--no-load_in_4bit",
                 "--gradient_checkpointing" if args.gradient_checkpointing else "--no-gradient_checkpointing",
                 "--out", os.path.join(args.out, f"bench_{size}")]
        if args.trl and i == 0:
            bench.append("--vs-trl")
        steps.append(dict(name=f"bench_{size}", cmd=bench, result=os.path.join(args.out, f"bench_{size}", "result.json")))
        if args.trl and i == 0:  # TRL cannot take the image prompt without torchvision: then the same text-only work
            text = [a if a != os.path.join(args.out, f"bench_{size}") else os.path.join(args.out, f"bench_{size}_text")
                    for a in bench]
            text[text.index("--image_size") + 1] = "0"
            steps.append(dict(name=f"bench_{size}_text", cmd=text, only_if_trl_skipped=f"bench_{size}",
                              result=os.path.join(args.out, f"bench_{size}_text", "result.json")))
    if args.gog_steps and sizes:
        folder = args.gog_model or random_model_dir(args, sizes[0])
        tag = "tiny" if args.gog_model == "tiny" else sizes[0]
        gog_out = os.path.join(args.out, f"gog_{tag}")
        gog = [py, "-m", "common.gpu_check", "--peak-of", os.path.join(gog_out, "peak.json"), "--",
               os.path.join(ROOT, "gog.py"), "--stage", "all", "--model", folder, "--out", gog_out,
               "--max_steps", str(args.gog_steps), "--num_generations", "2", "--prompts_per_step", "1",
               "--n_scenes", "4", "--sft_max_steps", "2", "--levels_k", "2", "--max_new_tokens", "32",
               "--max_completion_length", "256", "--image_size", str(max(args.image_size, 56)),
               "--load_in_4bit", str(args.load_in_4bit).lower(),
               "--gradient_checkpointing" if args.gradient_checkpointing else "--no-gradient_checkpointing"]
        steps.append(dict(name=f"gog_{tag}", cmd=gog, result=os.path.join(gog_out, "peak.json")))
    return steps


# ---------------------------------------------------------------------------------------------
# running and judging
# ---------------------------------------------------------------------------------------------
def run_step(step: dict, log: Log, timeout: int) -> dict:
    if step.get("skip_if_exists") and os.path.exists(step["skip_if_exists"]):
        log(f"[gpu_check] {step['name']}: {os.path.dirname(step['skip_if_exists'])} exists, not rebuilt")
        return {"rc": 0, "seconds": 0.0, "skipped": "exists"}
    log(f"[gpu_check] {step['name']}: {shlex.join(step['cmd'])}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(step["cmd"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"{e.stdout or ''}{e.stderr or ''}\n[gpu_check] killed after {timeout} s"
        out = out if isinstance(out, str) else out.decode(errors="replace")
    dt = time.perf_counter() - t0
    for line in out.splitlines():
        log(f"    {line}")
    rec = {"rc": rc, "seconds": round(dt, 1)}
    if rc != 0:
        rec["error"] = next((ln for ln in reversed(out.splitlines()) if ln.strip()), "no output")[:300]
    if step["name"] == "pytest_gpu":
        rec["summary"] = next((ln for ln in reversed(out.splitlines()) if " in " in ln and ("passed" in ln
                               or "skipped" in ln or "failed" in ln or "deselected" in ln)), "")
        if rc == 5:  # pytest: no tests collected
            rec["rc"] = 0
    if rc == 0 and step.get("result"):
        try:
            with open(step["result"]) as f:
                rec["result"] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            rec.update(rc=1, error=f"no result file {step['result']} ({e})")
    log(f"[gpu_check] {step['name']}: {'ok' if rec['rc'] == 0 else 'FAILED'} in {dt:.0f} s")
    return rec


def judge(results: dict, args) -> dict:
    """Budgets -> {name: {"value_gb", "budget_gb", "pass"}}; a missing figure fails its budget."""
    checks = {}
    for size, budget in BUDGET_GB.items():
        rec = results.get(f"bench_{size}")
        if rec is None:
            continue
        peak = (rec.get("result") or {}).get("ours", {}).get("peak_gb")
        checks[f"bench_{size}_peak"] = {"value_gb": peak, "budget_gb": budget,
                                        "pass": peak is not None and peak <= budget}
        gog = results.get(f"gog_{size}")
        if gog is not None:
            gpeak = (gog.get("result") or {}).get("peak_gb")
            checks[f"gog_{size}_peak"] = {"value_gb": gpeak, "budget_gb": budget,
                                          "pass": gpeak is not None and gpeak <= budget}
    return checks


def bench_line(size: str, res: dict) -> str:
    o = res.get("ours", {})
    s = (f"{size}: peak {o.get('peak_gb', float('nan')):.2f} GB | step {o.get('step_s', float('nan')):.1f} s "
         f"(generate {o.get('generate_s', 0):.1f}, logprob {o.get('logprob_s', 0):.1f}, "
         f"backward {o.get('backward_s', 0):.1f}) | {o.get('gen_tokens_per_s', 0):.0f} gen tok/s")
    if "fraction_of_bound" in res:
        s += f" = {100 * res['fraction_of_bound']:.1f}% of the bandwidth bound"
    if "trl_over_ours" in res:
        s += f" | TRL/ours {res['trl_over_ours']:.2f}x (tokens equal: {res.get('trl_tokens_equal')})"
    elif res.get("trl_skipped"):
        s += " | TRL: skipped"
    return s


def main(argv=None) -> int:
    from common.cli import UserError, parse_args
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--peak-of"]:
        return peak_of(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    if argv and not argv[0].startswith("-"):
        argv = ["--out", argv[0], *argv[1:]]          # tests/gpu_check.sh OUT [flags]
    args = parse_args(Args, argv, description=__doc__.split("\n")[0])
    if args.cpu_smoke:
        given = {a.lstrip("-").split("=")[0].replace("-", "_").removeprefix("no_") for a in argv if a.startswith("--")}
        for k, v in CPU_SMOKE.items():
            if k not in given:
                setattr(args, k, v)
    import torch
    if not torch.cuda.is_available() and not (args.cpu_smoke or args.dry_run):
        raise UserError("no CUDA GPU is visible; this check is for a GPU box (use --cpu-smoke or --dry-run here).")
    if args.load_in_4bit and not torch.cuda.is_available() and not args.dry_run:
        raise UserError("--load_in_4bit needs the CUDA path here; pass --no-load_in_4bit on a CPU.")
    bad = [s for s in args.sizes.split(",") if s.strip().lower() not in BUDGET_GB]
    if bad:
        raise UserError(f"--sizes takes 3b and/or 7b, not {', '.join(bad)}.")

    if not args.dry_run:
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(args.work, exist_ok=True)
        log_path = os.path.join(args.out, "gpu_check.log")
        open(log_path, "w").close()
    log = Log(None if args.dry_run else log_path)

    missing = [w for mod, w in OPTIONAL.items() if importlib.util.find_spec(mod) is None]
    inst = install_command(missing, os.path.join(ROOT, args.wheels) if not os.path.isabs(args.wheels) else args.wheels)
    steps = plan(args)
    if args.dry_run:
        print(f"[gpu_check] missing packages: {', '.join(missing) or 'none'}")
        if inst:
            print(shlex.join(inst))
        for s in steps:
            print(shlex.join(s["cmd"]))
        return 0

    t_start = time.perf_counter()
    summary = {"args": vars(args), "installed": [], "steps": {}}
    if missing:
        if inst is None:
            log(f"[gpu_check] missing {', '.join(missing)} and no wheel folder {args.wheels}/: the steps that "
                f"need them will fail (copy the wheels there; this check never uses the network)")
        else:
            log(f"[gpu_check] installing {', '.join(missing)} from {args.wheels}/: {shlex.join(inst)}")
            p = subprocess.run(inst, capture_output=True, text=True)
            log(p.stdout[-2000:] + p.stderr[-2000:])
            summary["installed"] = missing if p.returncode == 0 else []
            summary["install_rc"] = p.returncode
            importlib.invalidate_caches()
    summary["versions"] = versions()
    log("[gpu_check] versions: " + json.dumps(summary["versions"]))

    for s in steps:
        if s.get("only_if_trl_skipped"):
            prev = (summary["steps"].get(s["only_if_trl_skipped"]) or {}).get("result") or {}
            if not prev.get("trl_skipped"):
                continue
            log(f"[gpu_check] TRL skipped the image prompt ({prev['trl_skipped']}): the same work without the image")
        summary["steps"][s["name"]] = run_step(s, log, args.timeout)
        if s["name"].startswith("build_") and summary["steps"][s["name"]]["rc"] != 0:
            size = s["name"].split("_", 1)[1]
            log(f"[gpu_check] the random {size} model could not be built; its bench and gog steps will fail")

    results = summary["steps"]
    summary["budgets"] = judge(results, args)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    log("")
    log("[gpu_check] ===== summary =====")
    log(f"[gpu_check] {summary['versions'].get('device')} | torch {summary['versions']['torch']} | "
        f"transformers {summary['versions']['transformers']} | bitsandbytes {summary['versions']['bitsandbytes']} | "
        f"trl {summary['versions']['trl']}")
    for name, rec in results.items():
        extra = rec.get("summary") or (bench_line(name.split("_", 1)[1], rec["result"]) if name.startswith("bench_")
                                       and "result" in rec else "")
        if name.startswith("gog_") and "result" in rec:
            extra = f"peak {rec['result']['peak_gb']:.2f} GB"
        log(f"[gpu_check] {'ok  ' if rec['rc'] == 0 else 'FAIL'} {name:12s} {rec['seconds']:6.0f} s  {extra}"
            + (f"  ({rec['error']})" if rec.get("error") else ""))
    for name, c in summary["budgets"].items():
        v = "missing" if c["value_gb"] is None else f"{c['value_gb']:.2f} GB"
        log(f"[gpu_check] {'PASS' if c['pass'] else 'FAIL'} {name}: {v} <= {c['budget_gb']:.0f} GB")
    ok = all(r["rc"] == 0 for r in results.values()) and all(c["pass"] for c in summary["budgets"].values())
    summary["pass"] = ok
    log(f"[gpu_check] {'ALL PASS' if ok else 'SOME CHECKS FAILED'} in {summary['seconds']:.0f} s; "
        f"{os.path.join(args.out, 'summary.json')}")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return 0 if ok else 1


def peak_of(path: str, script_argv: list[str]) -> int:
    """Run a script in this process (as `python script args` would) and write its peak memory:
    torch.cuda.max_memory_allocated on a GPU, peak RSS otherwise."""
    import runpy

    import torch
    if not script_argv:
        raise SystemExit("--peak-of PATH -- SCRIPT [ARGS]")
    sys.argv = list(script_argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script_argv[0])))
    rc = 0
    try:
        runpy.run_path(script_argv[0], run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    cuda = torch.cuda.is_available()
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"peak_gb": peak / 2**30, "kind": "cuda_max_allocated" if cuda else "peak_rss", "rc": rc}, f)
    return rc


if __name__ == "__main__":
    from common.cli import UserError
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
