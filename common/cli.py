"""The five scripts' shared skeleton: a dataclass `Args` -> command line, and one stage runner.

    @dataclass
    class Args(GRPOConfig, RunArgs):          # GRPO fields: common/grpo.py; run + model: here
        stage: Literal["data", "sft", "rl", "eval", "all"] = "all"
        \"\"\"which stage to run\"\"\"
        beta: float = 0.001
        \"\"\"KL coefficient (GoG: 0.001)\"\"\"   # re-declared only because the paper's default
        differs
    def main(argv=None):
        run_stages(Args, {"data": stage_data, "sft": stage_sft, ...}, argv, doc=__doc__,
                   file=__file__, tiny=TINY_SIZES, check=check_inputs)

CleanRL style: the docstring under each field is its help; a `# --- name ---` comment above a
block of fields names its group in `--help`. Booleans get `--flag` / `--no-flag`; `Literal[...]`
fields get choices; `X | None` fields accept the word `none`. Field names keep TRL's spelling
(`--num_generations`); the dashed form works too. Abbreviations are refused (`--max_step` is an
error, not `--max_steps`).

User errors (bad values, missing or malformed files, unknown models) raise `UserError("one
sentence")`; `run_stages` prints `error: <sentence>` and exits 2, with the traceback only under
`--debug`. A write the system refuses during a stage (a full disk, a read-only folder) and Ctrl-C
end in one line as well: what could not be written and the RL checkpoint to `--resume` from.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import inspect
import json
import math
import os
import random
import re
import sys
import textwrap
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from common.checkpoint import latest_checkpoint
from common import distributed as dist
from common.errors import UserError
from common.grpo import GRPOConfig, check_config
from common.models import check_model_name


# =============================================================================================
# Shared fields: every script's `Args` extends RunArgs (and common.grpo.GRPOConfig when it runs RL)
# =============================================================================================
@dataclass
class RunArgs:
    # --- run ---
    stage: str = "all"
    """which stage to run (`all` = every stage in order)"""
    model: str = "auto"
    """policy: tiny | smollm2 | auto (Qwen2.5-VL-3B on CUDA, else tiny) | hub id | folder"""
    out: str = ""
    """output folder (default runs/<script>); each stage writes <out>/<stage>/"""
    seed: int = 0
    """seed of the toy data, the data order and the sampler"""
    debug: bool = False
    """show the full traceback of an error instead of one sentence"""
    # --- model ---
    load_in_4bit: bool | None = None
    """NF4 4-bit base weights: true | false | none (= auto: on for real models on CUDA, off for CPU
    presets)"""
    lora_r: int = 8
    """LoRA rank"""
    lora_alpha: int = 16
    """LoRA alpha"""
    gradient_checkpointing: bool | None = None
    """recompute activations in the backward: less memory, slower: true | false | none (= auto: on
    on CUDA, where a GRPO step of 8 rows needs ~7.4 GB on the 3B with it and ~50 GB without; off
    for CPU)"""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """compute dtype: auto = bfloat16 on a GPU with native bf16, float32 on a CPU (a GPU without
    native bf16, T4 class, is refused: pass float32, with --load_in_4bit to fit)"""
    max_pixels: int | None = 1280 * 28 * 28
    """image processor cap, pixels per image (prompt images and crops): 1280*28*28 = 1,280 visual
    tokens, as Qwen2.5-VL RL recipes train; none = the checkpoint's own (Qwen's 12.8 MP)"""
    min_pixels: int | None = 4 * 28 * 28
    """image processor floor, pixels per image (4 visual tokens, Qwen's default); none = the
    checkpoint's own"""


# =============================================================================================
# Dataclass -> argparse
# =============================================================================================
GROUP_RE = re.compile(r"^\s*#\s*-{2,}\s*(.+?)\s*-{2,}")


def _class_fields(cls) -> tuple[dict[str, str], dict[str, str]]:
    """({field: the string literal right under it}, {field: its `# --- group ---`}) of one class
    body."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}, {}
    lines, body = src.splitlines(), ast.parse(src).body[0].body
    docs, groups = {}, {}
    for a, b in zip(body, body[1:] + [None]):
        if not (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)):
            continue
        heads = [GROUP_RE.match(x) for x in lines[:a.lineno - 1]]
        heads = [m.group(1) for m in heads if m]
        if heads:
            groups[a.target.id] = heads[-1]
        if (isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant)
                and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs, groups


def field_docs(cls) -> dict[str, str]:
    """{field: help}: the docstring under the field in the most derived class that declares it."""
    docs = {}
    for c in reversed(cls.__mro__[:-1]):
        docs.update(_class_fields(c)[0])
    return docs


def field_groups(cls) -> dict[str, str]:
    """{field: group title}: the group of the class that declares the field first (a script that
    re-declares `beta` keeps it under GRPO); a script's fields before any `# ---` go under
    `options`."""
    groups: dict[str, str] = {}
    for c in reversed(cls.__mro__[:-1]):
        own = _class_fields(c)[1]
        for name in c.__dict__.get("__annotations__", {}):
            groups.setdefault(name, own.get(name, "options"))
    return groups


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "yes", "1", "on"):
        return True
    if v in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {s!r}")


def _parser_for(tp):
    """(argparse type, choices, is_bool) for a resolved annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return type(args[0]), list(args), False
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)][0]
        base, choices, is_bool = _parser_for(inner)
        base = _bool if is_bool else base

        def none_or(s: str):
            return None if s.lower() == "none" else base(s)
        none_or.__name__ = getattr(base, "__name__", "value")
        return none_or, choices, False
    if origin is list:   # comma-separated values: --reward_weights 1,0.5
        item = args[0]

        def items(s: str):
            return [item(x) for x in s.split(",") if x.strip()]
        items.__name__ = f"comma-separated {item.__name__}s"
        return items, None, False
    if tp is bool:
        return bool, None, True
    return tp, None, False


def build_parser(cls, description: str | None = None,
                 prog: str | None = None) -> argparse.ArgumentParser:
    hints, docs, groups = typing.get_type_hints(cls), field_docs(cls), field_groups(cls)
    p = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        g = groups.get(f.name, "options")
        section = sections.get(g) or sections.setdefault(g, p.add_argument_group(g))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ, choices, is_bool = _parser_for(hints[f.name])
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        help_ = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if is_bool:
            section.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                 default=default, help=help_)
        elif set(typing.get_args(hints[f.name])) == {bool, type(None)}:
            # bool | None: `--x` alone is true, `--no-x` false, `--x true|false|none` as written
            section.add_argument(*names, dest=f.name, type=typ, nargs="?", const=True,
                                 default=default, help=help_)
            section.add_argument(*[f"--no-{n[2:]}" for n in names], dest=f.name,
                                 action="store_const", const=False, help=argparse.SUPPRESS)
        else:
            section.add_argument(*names, dest=f.name, type=typ, choices=choices, default=default,
                                 help=help_)
    return p


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations the user set on the command line (parsed, so `--x=1`, `--x 1` and `--no-x` all
    count)."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a in parser._actions:
            a.default = saved[a.dest]


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    return cls(**vars(build_parser(cls, description).parse_args(argv)))


# =============================================================================================
# The stage runner
# =============================================================================================
def is_tiny(args) -> bool:
    """The CPU preset: `--model tiny`, or `auto` on a machine without CUDA."""
    if args.model == "tiny":
        return True
    if args.model != "auto":
        return False
    return not torch.cuda.is_available()


def start_adapter(args, *stages: str) -> str | None:
    """The adapter a stage starts from: the first `<out>/<stage>/adapter` that exists, in the
    order given (eval: `"rl", "sft"`; RL: `"sft"`), else None (a fresh LoRA on the base model)."""
    for s in stages or ("rl", "sft"):
        path = Path(args.out) / s / "adapter"
        if (path / "adapter_config.json").is_file():
            return str(path)
    return None


def _jsonable(x):
    return x if isinstance(x, (str, int, float, bool, type(None))) else str(x)


def run_stages(cls, stages: dict[str, Callable], argv: list[str] | None = None, *,
               doc: str | None = None,
               file: str | None = None, tiny: dict | None = None, check: Callable | None = None):
    """Parse `cls` from argv, apply the tiny-preset sizes, validate, run the stage(s), write
    args.json.

    `stages` maps each stage name to `fn(args)`, in the order `--stage all` runs them. `tiny`
    replaces the defaults of those fields under the CPU preset unless the user gave them.
    `check(args)` runs before any stage (so a bad input file fails in seconds, before a model is
    loaded or trained).
    A `UserError` (or a missing/unreadable file) becomes `error: <sentence>` and exit code 2.
    Under torchrun every rank runs every stage (common/distributed.py), in step after each."""
    dist.init()
    name = Path(file or sys.argv[0]).stem
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(cls, doc, prog=f"{name}.py")
    args = cls(**vars(parser.parse_args(argv)))
    running = None   # the stage under way, for the resume hint
    try:
        if not args.out:
            args.out = f"runs/{name}"
        if tiny and is_tiny(args):
            given = given_flags(parser, argv)
            sizes = {k: v for k, v in tiny.items() if k not in given}
            for k, v in sizes.items():
                setattr(args, k, v)
            print(f"[{name}] tiny CPU preset, small sizes: {sizes} (flags you pass win). Its "
                  f"numbers are noise.")
        if args.stage != "all" and args.stage not in stages:
            raise UserError(f"unknown stage {args.stage!r}; choose from {', '.join(stages)} or "
                            f"all.")
        _check_out(args.out)
        check_model_name(args.model)
        _check_finite(args)
        if isinstance(args, GRPOConfig):
            check_config(args)
        if check is not None:
            check(args)
        results = {}
        for stage in (list(stages) if args.stage == "all" else [args.stage]):
            random.seed(args.seed)
            t0 = time.perf_counter()
            running = stage
            results[stage] = stages[stage](args)
            dist.barrier()   # what a stage wrote (rank 0) is there before the next reads it
            print(f"[{name}] stage {stage} took {time.perf_counter() - t0:.1f} s")
        running = ""   # past the stages: args.json, in <out> itself
        if dist.is_main():
            with open(os.path.join(args.out, "args.json"), "w") as f:
                json.dump({**{k: _jsonable(v) for k, v in dataclasses.asdict(args).items()},
                           **dist.describe(args.seed)}, f, indent=1)
        dist.close()
        return results
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted (Ctrl-C)" + (f" during stage {running}" if running else "")
              + (_resume_hint(args, running) or "; run the stage again to redo its work."),
              file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        # a full disk, a read-only folder (not before the stages: there a file is read)
        why = _write_failure(e) if running is not None else None
        if args.debug or not (why or isinstance(e, USER_ERRORS)):
            raise
        if why:
            print(f"error: could not write into {Path(args.out) / running} ({why})"
                  f"{_resume_hint(args, running) or '; free space or pass a writable --out.'}",
                  file=sys.stderr)
        else:
            print(f"error: {_sentence(e)}", file=sys.stderr)
        raise SystemExit(2) from None


# a user's mistake or a file that is missing / unreadable: one sentence, exit 2
USER_ERRORS = (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
               PermissionError, UnicodeDecodeError)
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}


def _write_failure(e: BaseException) -> str | None:
    """Why a write failed, for an OSError of WRITE_ERRNOS, or a library error whose text names
    one (safetensors' SafetensorError wraps the OS error in its message); else None."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return WRITE_ERRNOS[e.errno] + (f": {e.filename}" if e.filename else "")
    text = str(e)
    for code, why in WRITE_ERRNOS.items():
        if os.strerror(code) in text or f"code: {code}," in text:
            return why
    return None


def _resume_hint(args, stage: str | None) -> str:
    """"; continue from <out>/rl/checkpoint-N with --stage rl --resume" when the RL stage (the
    one that resumes: GRPOConfig.resume) stopped after saving a checkpoint."""
    if stage != "rl" or not isinstance(args, GRPOConfig):
        return ""
    path = latest_checkpoint(os.path.join(args.out, stage))
    return f"; continue from {path} with --stage rl --resume." if path else ""


def check_values(args, rules: dict[str, tuple[Callable, str]]) -> None:
    """One sentence for the first field whose value fails its rule: {field: (ok(value), "what
    it must be")}, e.g. {"top_p": (lambda v: 0 < v <= 1, "in (0, 1]")}. A script's check_inputs
    passes its own table."""
    for name, (ok, must) in rules.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise UserError(f"--{name} must be {must}, not {value}.")


def _check_finite(args) -> None:
    """No float setting may be nan or inf (argparse's float() accepts both)."""
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"--{f.name} must be a finite number, not {v}.")
        if isinstance(v, list) and any(isinstance(x, float) and not math.isfinite(x) for x in v):
            raise UserError(f"--{f.name} must hold finite numbers, not {v}.")


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out!r} is a file, not a folder; pass a folder path.")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder --out {out!r} ({e.strerror}); pass a "
                        f"writable --out.")
    if not os.access(out, os.W_OK):
        raise UserError(f"the output folder --out {out!r} is not writable; pass a writable --out.")


def _sentence(e: BaseException) -> str:
    if isinstance(e, UnicodeDecodeError):
        return (f"a file is not valid {e.encoding} ({e.reason} at byte {e.start}); convert it to "
                f"UTF-8.")
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
