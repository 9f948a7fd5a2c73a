"""The prepared GPU check: one command that proves the consumer-GPU promise on one CUDA
GPU, offline.

    tests/gpu_check.sh runs/gpu_check                 # on the GPU box: ~8 minutes on one H100/H200
    tests/gpu_check.sh runs/gpu_check --dry-run       # print the commands it would run, run nothing
    tests/gpu_check.sh runs/gpu_check --ci-smoke      # CI: every step at toy size on a CPU,
                                                      ~1 minute
    tests/gpu_check.sh runs/gpu_check --cpu-smoke     # the real-width plumbing (1-layer 3B, TRL)
                                                      on a CPU, ~8 min

What it does, in order, writing everything into the folder given (`summary.json`, `gpu_check.log`,
one sub-folder per step):
  1. packages: uses the Python that is there; installs a missing bitsandbytes / trl / peft from
     a local `.whl/` folder of wheels (`pip install --no-index --find-links .whl`), never from the
     network; records the versions it ran with (python, torch, CUDA, transformers, peft,
     bitsandbytes, trl, the GPU and its memory).
  2. `pytest -m gpu`: the CUDA tests (tests/test_gpu.py: NF4 load, LoRA-only gradients, the
     reference pass, GRPO steps with images, chunked = full log-probs, resume restoring the device
     RNG); a skipped CUDA test fails the check.
  3. `common.perf.bench` on random-weight Qwen2.5-VL-3B and -7B built from the published configs,
     NF4 + LoRA + gradient checkpointing, G = 8, one 448x448 image, 512 new tokens: peak allocated
     memory, step time split, generated tokens/s and its fraction of the HBM-bandwidth bound, and
     TRL's step time on 3B side by side (each side in its own process).
  4. `gog.py --stage all` on the random 3B for 2 RL steps (real-size plumbing: image tokens,
     crops, 4-bit training) with its peak memory.
  5. Budgets, printed as PASS/FAIL and stored in summary.json: 3B peak <= 12 GB, 7B peak <= 16 GB
     (the README's consumer-GPU promise; T4 class for 7B). Exit status 0 only when every step ran
     and every budget holds.

--ci-smoke runs the same plan, run, judge and summary code at toy size on a CPU (pytest only
collects the CUDA tests; bench and gog on the tiny preset), each step forked from this process so
that Python and torch are imported once; it is in the fast test suite. --cpu-smoke is the slower
real-width one.

Random weights: the numbers are sizes and speeds of the real architectures; the text is noise.
The random models are written once to --work (default /tmp/gpu_check_models: 3B ~7.5 GB, 7B ~17 GB
in bf16), outside the output folder, so the folder stays small enough to copy back.

Size: about 600 lines because it plans, runs, times and judges every GPU step in one
command that must work on a fresh machine; a tool, imported by no script."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import runpy
import select
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

from common.cli import parse_args
from common.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUDGET_GB = {"3b": 12.0, "7b": 16.0}   # peak allocated GPU memory per GRPO step (DESIGN.md budgets)
OPTIONAL = {"bitsandbytes": "bitsandbytes", "trl": "trl", "peft": "peft"}   # import -> wheel name


@dataclass
class Args:
    out: str = "runs/gpu_check"
    """folder for summary.json, gpu_check.log and each step's output
    (the first positional argument)"""
    dry_run: bool = False
    """print the commands it would run, run nothing"""
    ci_smoke: bool = False
    """the CI smoke on a CPU: pytest only collects the gpu tests, the bench runs on the tiny preset
    (no build step, no TRL), gog on tiny; 1 step, G = 2, 2 tokens, 56 px, no 4-bit; each step is
    forked from this process, so Python and torch are imported once"""
    cpu_smoke: bool = False
    """the slower CPU smoke: random 1-layer Qwen2.5-VL-3B at its real width (1k vocab), with TRL,
    4 tokens"""
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
    pytest_collect_only: bool = False
    """only collect the gpu tests (they import and are found), run none: the CI smoke"""
    timeout: int = 900
    """seconds per command before it is killed and counted as failed"""


CPU_SMOKE = dict(num_layers=1, vocab_size=1024, num_generations=2, image_size=56, max_new_tokens=4,
                 steps=1, warmup=0, load_in_4bit=False, gradient_checkpointing=True, sizes="3b",
                 gog_steps=1, gog_model="tiny", pytest=False)
CI_SMOKE = dict(num_generations=2, image_size=56, max_new_tokens=2, steps=1, warmup=0,
                load_in_4bit=False, gradient_checkpointing=True, sizes="tiny", trl=False,
                gog_steps=1, gog_model="tiny", pytest_collect_only=True, timeout=240)
# the CI smoke's bench model, judged against the 3B budget (plumbing)
SMOKE_SIZES = {"tiny": BUDGET_GB["3b"]}


GUIDE = ("[gpu_check] On the GPU box (one CUDA GPU, no internet needed):\n"
         "    git clone/copy this repository; optionally put wheels for a missing bitsandbytes /"
         " trl / peft in ./.whl/\n"
         "    tests/gpu_check.sh runs/gpu_check          # ~8 minutes on one H100/H200;"
         " exit 0 = every step ran, budgets hold\n"
         "    then copy back runs/gpu_check/ (summary.json + gpu_check.log, a few MB; the models"
         " stay in --work)\n"
         "[gpu_check] The figures (summary.json steps.<step>.result, and the summary block at the"
         " end of the log):\n"
         "    peak_gb           torch.cuda.max_memory_allocated of our side's process"
         " (model + LoRA + optimiser +\n"
         "                      activations), over the whole run incl. the warm-up step; on a CPU:"
         " the process's peak RSS\n"
         "    step_s            median seconds per GRPO step = generate_s (sampling G completions)"
         " + logprob_s (the no-grad\n"
         "                      reference pass, beta = 0.04) + backward_s (forward with grad +"
         " backward + AdamW) + other_s\n"
         "    gen_tokens_per_s  generated tokens / generate_s (B = G rows, forced to exactly"
         " --max_new_tokens each)\n"
         "    limits.decode_fraction   gen_tokens_per_s / (B x measured bandwidth / bytes of"
         " weights read per decode step);\n"
         "                      the vendor HBM figure is printed beside the measured bandwidth\n"
         "    trl_over_ours     TRL GRPOTrainer's step time / ours, same work (> 1: ours faster);"
         " trl_tokens_equal says\n"
         "                      both sides generated the same token counts every step (text-only"
         " when TRL lacks torchvision)\n"
         "    gog peak_gb       the peak of gog.py --stage all (SFT, RL, eval) on the random 3B:"
         " real image tokens and crops\n"
         "[gpu_check] Budgets (PASS/FAIL, DESIGN.md): bench_3b_peak <= 12 GB,"
         " bench_7b_peak <= 16 GB (T4 class); the gog\n"
         "    run on 3B is held to the 3B budget. pytest -m gpu must pass with nothing skipped.")


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
# the 4-bit + LoRA path: imported, so a broken install shows
IMPORT_CHECKED = ("transformers", "peft", "bitsandbytes")


def version_of(module: str, load: bool = True) -> str | None:
    """The installed version; with load, the module is imported too, and one that is there but
    does not import (e.g. bitsandbytes without its CUDA libraries) is reported as broken. Without,
    the metadata only (trl, datasets, accelerate import for ~10 s on a busy CPU; the steps that
    need them import them anyway)."""
    if importlib.util.find_spec(module) is None:
        return None
    if not load:
        try:
            return importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"
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
    for mod in ("transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets",
                "torchvision"):
        v[mod] = version_of(mod, load=mod in IMPORT_CHECKED)
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
        # CI: the CUDA tests import and are found (running them needs a GPU)
        if args.pytest_collect_only:
            cmd = [py, "-m", "pytest", "-m", "gpu", "--collect-only", "-q",
                   "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "test_gpu.py")]
        else:                          # -rs: a skipped CUDA test says why (a skip fails this check)
            cmd = [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                   os.path.join(ROOT, "tests")]
        steps.append(dict(name="pytest_gpu", cmd=cmd))
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    for i, size in enumerate(sizes):
        if size in SMOKE_SIZES:        # a preset: nothing to build
            folder = size
        else:
            folder = random_model_dir(args, size)
            build = [py, "-m", "common.perf.bench", "--model", f"qwen2.5-vl-{size}",
                     "--random-weights",
                     "--num_layers", str(args.num_layers), "--vocab_size", str(args.vocab_size),
                     "--save_model", folder]
            steps.append(dict(name=f"build_{size}", cmd=build,
                              skip_if_exists=os.path.join(folder, "config.json")))
        bench = [py, "-m", "common.perf.bench", "--model", folder,
                 "--num_generations", str(args.num_generations),
                 "--image_size", str(args.image_size), "--max_new_tokens", str(args.max_new_tokens),
                 "--prompt_tokens", "64", "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--beta", "0.04", "--load_in_4bit" if args.load_in_4bit else "--no-load_in_4bit",
                 "--gradient_checkpointing" if args.gradient_checkpointing
                 else "--no-gradient_checkpointing",
                 "--out", os.path.join(args.out, f"bench_{size}")]
        if args.trl and i == 0:
            bench.append("--vs-trl")
        steps.append(dict(name=f"bench_{size}", cmd=bench,
                          result=os.path.join(args.out, f"bench_{size}", "result.json")))
        # TRL cannot take the image prompt without torchvision: then the same text-only work
        if args.trl and i == 0:
            text = [a if a != os.path.join(args.out, f"bench_{size}")
                    else os.path.join(args.out, f"bench_{size}_text")
                    for a in bench]
            text[text.index("--image_size") + 1] = "0"
            steps.append(dict(name=f"bench_{size}_text", cmd=text,
                              only_if_trl_skipped=f"bench_{size}",
                              result=os.path.join(args.out, f"bench_{size}_text", "result.json")))
    if args.gog_steps and sizes:
        folder = args.gog_model or random_model_dir(args, sizes[0])
        tag = "tiny" if args.gog_model == "tiny" else sizes[0]
        gog_out = os.path.join(args.out, f"gog_{tag}")
        # the CI smoke: the fewest scenes, steps and tokens that still run every stage
        n_scenes, sft, k, new, total = (4, 1, 1, 4, 64) if args.ci_smoke else (4, 2, 2, 32, 256)
        gog = [py, "-m", "common.perf.gpu_check", "--peak-of", os.path.join(gog_out, "peak.json"),
               "--", os.path.join(ROOT, "gog.py"), "--stage", "all", "--model", folder,
               "--out", gog_out, "--max_steps", str(args.gog_steps), "--num_generations", "2",
               "--prompts_per_step", "1", "--n_scenes", str(n_scenes), "--sft_max_steps", str(sft),
               "--levels_k", str(k), "--max_new_tokens", str(new),
               "--max_completion_length", str(total), "--image_size", str(max(args.image_size, 56)),
               "--load_in_4bit", str(args.load_in_4bit).lower(),
               "--gradient_checkpointing" if args.gradient_checkpointing
               else "--no-gradient_checkpointing"]
        steps.append(dict(name=f"gog_{tag}", cmd=gog, result=os.path.join(gog_out, "peak.json")))
    return steps


# ---------------------------------------------------------------------------------------------
# running and judging
# ---------------------------------------------------------------------------------------------
def _exec(cmd: list[str], env: dict, timeout: int) -> tuple[int, str]:
    """A fresh process (the GPU run: each step starts with an empty CUDA allocator)."""
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = f"{e.stdout or ''}{e.stderr or ''}"
        return 124, ((out if isinstance(out, str) else out.decode(errors="replace"))
                     + f"\n[gpu_check] killed after {timeout} s")


def _fork(cmd: list[str], env: dict, timeout: int) -> tuple[int, str]:
    """`python -m MODULE ARGS` in a fork of this process (the CI smoke on a CPU): the child already
    has Python, torch and transformers imported, which under a shared load is most of a toy step's
    time. Same contract as _exec: exit status, stdout + stderr, killed (124) after `timeout`
    seconds."""
    if cmd[:2] != [sys.executable, "-m"]:
        return _exec(cmd, env, timeout)
    r, w = os.pipe()
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller
        code = 1
        try:
            os.close(r)
            os.dup2(w, 1), os.dup2(w, 2)
            sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
            os.chdir(ROOT)
            os.environ.update(env)
            import torch
            # an OpenMP pool of 1 thread: nothing inherited from the parent to deadlock on
            torch.set_num_threads(1)
            sys.argv = [cmd[2], *cmd[3:]]
            try:
                runpy.run_module(cmd[2], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = (e.code if isinstance(e.code, int)
                        else (0 if e.code is None else (print(e.code) or 1)))
        except BaseException:  # noqa: BLE001 - the child reports any failure: traceback, exit 1
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(w)
    chunks, deadline, killed = [], time.monotonic() + timeout, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        ready, _, _ = select.select([r], [], [], min(left, 1.0))
        if ready:
            data = os.read(r, 1 << 16)
            if not data:
                break
            chunks.append(data)
    os.close(r)
    status = os.waitpid(pid, 0)[1]
    out = b"".join(chunks).decode(errors="replace")
    if killed:
        return 124, out + f"\n[gpu_check] killed after {timeout} s"
    return (os.waitstatus_to_exitcode(status), out)


def pytest_counts(out: str) -> dict:
    """pytest's last summary line -> {"passed": n, "skipped": n, ...}
    ("9 tests collected in 3s" -> collected)."""
    line = next((ln for ln in reversed(out.splitlines())
                 if re.search(r"\b(passed|failed|skipped|error|errors|deselected|collected"
                              r"|no tests ran)\b", ln)), "")
    counts = {k.rstrip("s") if k in ("errors", "tests") else k: int(n)
              for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors|error|deselected"
                                     r"|xfailed|xpassed)", line)}
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", line)
    if m:
        counts["collected"] = int(m.group(1))
    return {"line": line.strip(), **counts}


def run_step(step: dict, log: Log, timeout: int, fork: bool = False) -> dict:
    if step.get("skip_if_exists") and os.path.exists(step["skip_if_exists"]):
        log(f"[gpu_check] {step['name']}: {os.path.dirname(step['skip_if_exists'])} exists, "
            f"not rebuilt")
        return {"rc": 0, "seconds": 0.0, "skipped": "exists"}
    log(f"[gpu_check] {step['name']}: {shlex.join(step['cmd'])}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")
    t0 = time.perf_counter()
    rc, out = (_fork if fork else _exec)(step["cmd"], env, timeout)
    dt = time.perf_counter() - t0
    for line in out.splitlines():
        log(f"    {line}")
    rec = {"rc": rc, "seconds": round(dt, 1)}
    if rc != 0:
        rec["error"] = next((ln for ln in reversed(out.splitlines()) if ln.strip()),
                            "no output")[:300]
    if step["name"] == "pytest_gpu":
        c = pytest_counts(out)
        rec["summary"], rec["counts"] = c.pop("line"), c
        if "--collect-only" in step["cmd"]:
            if rc == 0 and not c.get("collected"):
                rec.update(rc=1, error="pytest collected no gpu tests")
        # on the GPU box a skipped CUDA test is a failure
        elif rc == 0 and (c.get("skipped") or not c.get("passed")):
            rec.update(rc=1, error=f"{c.get('skipped', 0)} gpu tests skipped, "
                                   f"{c.get('passed', 0)} passed: is CUDA visible to torch?")
        elif rc == 5:
            rec["error"] = "pytest collected no gpu tests"
    if rc == 0 and step.get("result"):
        try:
            with open(step["result"]) as f:
                rec["result"] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            rec.update(rc=1, error=f"no result file {step['result']} ({e})")
    log(f"[gpu_check] {step['name']}: {'ok' if rec['rc'] == 0 else 'FAILED'} in {dt:.0f} s")
    return rec


def judge(results: dict, args, budgets: dict | None = None) -> dict:
    """Budgets -> {name: {"value_gb", "budget_gb", "pass"}}; a missing figure fails its budget."""
    checks = {}
    for size, budget in (budgets or BUDGET_GB).items():
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
    o, lim = res.get("ours", {}), res.get("limits") or {}
    s = (f"{size}: peak {o.get('peak_gb', float('nan')):.2f} GB "
         f"| step {o.get('step_s', float('nan')):.1f} s "
         f"(generate {o.get('generate_s', 0):.1f}, logprob {o.get('logprob_s', 0):.1f}, "
         f"backward {o.get('backward_s', 0):.1f}) | {o.get('gen_tokens_per_s', 0):.0f} gen tok/s")
    if "decode_fraction" in lim:
        s += (f" = {100 * lim['decode_fraction']:.1f}% of the bandwidth bound "
              f"({lim['bandwidth_gbps']:.0f} GB/s measured"
              + (f", vendor {lim['hbm_vendor_gbps']} GB/s" if lim.get("hbm_vendor_gbps") else "")
              + ")")
    if "trl_over_ours" in res:
        s += (f" | TRL/ours {res['trl_over_ours']:.2f}x "
              f"(tokens equal: {res.get('trl_tokens_equal')})")
    elif res.get("trl_skipped"):
        s += " | TRL: skipped"
    return s


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--peak-of"]:
        return peak_of(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    if argv and not argv[0].startswith("-"):
        argv = ["--out", argv[0], *argv[1:]]          # tests/gpu_check.sh OUT [flags]
    args = parse_args(Args, argv, description=__doc__.split("\n")[0])
    if args.cpu_smoke and args.ci_smoke:
        raise UserError("pass --ci-smoke or --cpu-smoke, not both.")
    preset = CI_SMOKE if args.ci_smoke else CPU_SMOKE if args.cpu_smoke else {}
    given = {a.lstrip("-").split("=")[0].replace("-", "_").removeprefix("no_") for a in argv
             if a.startswith("--")}
    for k, v in preset.items():
        if k not in given:
            setattr(args, k, v)
    smoke = args.ci_smoke or args.cpu_smoke
    import torch
    if not torch.cuda.is_available() and not (smoke or args.dry_run):
        raise UserError("no CUDA GPU is visible; this check is for a GPU box "
                        "(use --ci-smoke, --cpu-smoke or --dry-run here).")
    if args.load_in_4bit and not torch.cuda.is_available() and not args.dry_run:
        raise UserError("--load_in_4bit needs the CUDA path here; pass --no-load_in_4bit on a CPU.")
    budgets = dict(BUDGET_GB, **(SMOKE_SIZES if args.ci_smoke else {}))
    bad = [s for s in args.sizes.split(",") if s.strip().lower() not in budgets]
    if bad:
        raise UserError(f"--sizes takes {' and/or '.join(budgets)}, not {', '.join(bad)}.")

    if not args.dry_run:
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(args.work, exist_ok=True)
        log_path = os.path.join(args.out, "gpu_check.log")
        open(log_path, "w").close()
    log = Log(None if args.dry_run else log_path)

    missing = [w for mod, w in OPTIONAL.items() if importlib.util.find_spec(mod) is None]
    inst = install_command(missing, (os.path.join(ROOT, args.wheels)
                                     if not os.path.isabs(args.wheels) else args.wheels))
    steps = plan(args)
    if args.dry_run:
        print(GUIDE)
        print(f"[gpu_check] packages missing here: {', '.join(missing) or 'none'}")
        if inst:
            print(f"# install from {args.wheels}/\n{shlex.join(inst)}")
        print("[gpu_check] The commands it would run:")
        for s in steps:
            note = (" (only when the TRL side skipped the image prompt)"
                    if s.get("only_if_trl_skipped") else
                    " (skipped when the folder exists)" if s.get("skip_if_exists") else "")
            print(f"# {s['name']}{note}\n{shlex.join(s['cmd'])}")
        print("# budgets: " + ", ".join(f"bench_{k}_peak <= {v:.0f} GB" for k, v in budgets.items()
                                       if any(st["name"] == f"bench_{k}" for st in steps)))
        return 0

    t_start = time.perf_counter()
    summary = {"args": vars(args), "installed": [], "steps": {}}
    if missing:
        if inst is None:
            log(f"[gpu_check] missing {', '.join(missing)} and no wheel folder {args.wheels}/: "
                f"the steps that need them will fail "
                f"(copy the wheels there; this check never uses the network)")
        else:
            log(f"[gpu_check] installing {', '.join(missing)} from {args.wheels}/: "
                f"{shlex.join(inst)}")
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
            log(f"[gpu_check] TRL skipped the image prompt ({prev['trl_skipped']}): "
                f"the same work without the image")
        summary["steps"][s["name"]] = run_step(s, log, args.timeout,
                                               fork=args.ci_smoke and not torch.cuda.is_available())
        if s["name"].startswith("build_") and summary["steps"][s["name"]]["rc"] != 0:
            size = s["name"].split("_", 1)[1]
            log(f"[gpu_check] the random {size} model could not be built; "
                f"its bench and gog steps will fail")

    results = summary["steps"]
    summary["budgets"] = judge(results, args, budgets)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    log("")
    log("[gpu_check] ===== summary =====")
    log(f"[gpu_check] {summary['versions'].get('device')} | torch {summary['versions']['torch']} "
        f"| transformers {summary['versions']['transformers']} "
        f"| bitsandbytes {summary['versions']['bitsandbytes']} | trl {summary['versions']['trl']}")
    for name, rec in results.items():
        extra = rec.get("summary") or (bench_line(name.split("_", 1)[1], rec["result"])
                                       if name.startswith("bench_") and "result" in rec else "")
        if name.startswith("gog_") and "result" in rec:
            extra = f"peak {rec['result']['peak_gb']:.2f} GB"
        log(f"[gpu_check] {'ok  ' if rec['rc'] == 0 else 'FAIL'} {name:12s} "
            f"{rec['seconds']:6.0f} s  {extra}"
            + (f"  ({rec['error']})" if rec.get("error") else ""))
    for name, c in summary["budgets"].items():
        v = "missing" if c["value_gb"] is None else f"{c['value_gb']:.2f} GB"
        log(f"[gpu_check] {'PASS' if c['pass'] else 'FAIL'} {name}: {v} <= {c['budget_gb']:.0f} GB"
            + (" (the tiny preset against the 3B budget: plumbing, not the promise)"
               if name.startswith(("bench_tiny", "gog_tiny")) else ""))
    ok = (all(r["rc"] == 0 for r in results.values())
          and all(c["pass"] for c in summary["budgets"].values()))
    summary["pass"] = ok
    log(f"[gpu_check] {'ALL PASS' if ok else 'SOME CHECKS FAILED'} in {summary['seconds']:.0f} s; "
        f"{os.path.join(args.out, 'summary.json')}")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return 0 if ok else 1


def peak_of(path: str, script_argv: list[str]) -> int:
    """Run a script in this process (as `python script args` would) and write its peak memory:
    torch.cuda.max_memory_allocated on a GPU, peak RSS otherwise."""
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
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"peak_gb": peak / 2**30, "kind": "cuda_max_allocated" if cuda else "peak_rss",
                   "rc": rc}, f)
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
