# Run: pytest tests/test_cli.py -q
"""The dataclass -> CLI helper: field docstrings as help, bools, optional values, choices."""
from dataclasses import dataclass
from typing import Literal

import pytest

from common.cli import field_docs, parse_args


@dataclass
class Args:
    beta: float = 0.001
    """KL coefficient beta (100% optional)"""
    load_in_4bit: bool | None = None
    """NF4 (none = auto)"""
    lora: bool = True
    """use LoRA"""
    loss_type: Literal["grpo", "dapo"] = "grpo"
    """aggregation"""
    num_generations: int = 4
    """= G"""


def test_parse_args():
    a = parse_args(Args, ["--beta", "0.5", "--load_in_4bit", "false", "--no-lora",
                          "--num-generations", "8"])
    assert (a.beta, a.load_in_4bit, a.lora, a.num_generations) == (0.5, False, False, 8)
    assert parse_args(Args, ["--load_in_4bit", "none"]).load_in_4bit is None
    assert parse_args(Args, ["--load_in_4bit", "yes"]).load_in_4bit is True
    assert parse_args(Args, []) == Args()
    with pytest.raises(SystemExit):
        parse_args(Args, ["--loss_type", "ppo"])
    with pytest.raises(SystemExit):
        parse_args(Args, ["--load_in_4bit", "maybe"])
    assert field_docs(Args)["num_generations"] == "= G"


def test_help_with_percent(capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, ["--help"])
    assert "100% optional" in capsys.readouterr().out


# --- the shared skeleton: RunArgs / GRPOConfig, groups, run_stages, errors ---------------------
import json  # noqa: E402
import os  # noqa: E402

from common.cli import (RunArgs, build_parser, field_groups, given_flags,  # noqa: E402
                        run_stages, start_adapter)
from common.grpo import GRPOConfig  # noqa: E402
from common.errors import UserError  # noqa: E402


@dataclass
class PaperArgs(GRPOConfig, RunArgs):
    stage: Literal["data", "rl", "all"] = "all"
    """which stage"""
    beta: float = 0.04
    """KL coefficient (Paper: 0.04)"""
    # --- toy world ---
    n_scenes: int = 64
    """scenes"""


def test_base_fields_are_inherited_and_redeclared_defaults_win():
    a = parse_args(PaperArgs, [])
    assert a.beta == 0.04 and a.num_generations == 4 and a.n_scenes == 64 and a.stage == "all"
    # the script's help wins
    assert field_docs(PaperArgs)["beta"] == "KL coefficient (Paper: 0.04)"
    g = field_groups(PaperArgs)
    assert ((g["model"], g["lora_r"], g["beta"], g["n_scenes"])
            == ("run", "model", "GRPO (TRL names)", "toy world"))


def test_help_is_grouped(capsys):
    with pytest.raises(SystemExit):
        build_parser(PaperArgs).parse_args(["--help"])
    out = capsys.readouterr().out
    assert (out.index("run:") < out.index("model:") < out.index("GRPO (TRL names):")
            < out.index("toy world:"))
    assert "Paper: 0.04" in out


def test_abbreviations_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(PaperArgs, ["--max_step", "5"])   # argparse would take it as --max_steps
    assert "unrecognized arguments: --max_step" in capsys.readouterr().err


def test_given_flags_sees_every_spelling():
    p = build_parser(PaperArgs)
    assert given_flags(p, ["--max_steps=3", "--num-generations", "2", "--no-resume"]) == \
        {"max_steps", "num_generations", "resume"}
    assert p.parse_args([]).max_steps == 200   # defaults restored afterwards


def test_grpo_config_carries_every_field():
    a = parse_args(PaperArgs, ["--micro_batch_size", "3", "--save_steps", "5", "--seed", "7"])
    cfg = GRPOConfig.of(a, max_steps=9)
    assert ((cfg.micro_batch_size, cfg.save_steps, cfg.seed, cfg.beta, cfg.max_steps)
            == (3, 5, 7, 0.04, 9))


def test_run_stages_order_tiny_sizes_and_args_json(tmp_path, capsys):
    seen = []
    stages = {"data": lambda a: seen.append(("data", a.max_steps, a.num_generations)),
              "rl": lambda a: seen.append(("rl", a.max_steps, a.num_generations))}
    run_stages(PaperArgs, stages,
               ["--model", "tiny", "--out", str(tmp_path), "--num_generations", "3"],
               file="paper.py", tiny={"max_steps": 2, "num_generations": 2})
    assert seen == [("data", 2, 3), ("rl", 2, 3)]          # tiny size applied, the user's flag wins
    assert json.loads((tmp_path / "args.json").read_text())["max_steps"] == 2
    seen.clear()
    run_stages(PaperArgs, stages, ["--model", "smollm2", "--out", str(tmp_path), "--stage", "rl"],
               file="paper.py", tiny={"max_steps": 2})
    assert seen == [("rl", 200, 4)]                       # no tiny sizes for a real model


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    def bad(a):
        raise UserError("the file x.json:3 lacks 'answer'.")
    with pytest.raises(SystemExit) as e:
        run_stages(PaperArgs, {"data": bad}, ["--out", str(tmp_path), "--stage", "data"],
                   file="p.py")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: the file x.json:3 lacks 'answer'.\n"
    with pytest.raises(UserError):   # --debug shows the real exception
        run_stages(PaperArgs, {"data": bad},
                   ["--out", str(tmp_path), "--stage", "data", "--debug"], file="p.py")


def test_check_runs_before_any_stage(tmp_path, capsys):
    ran = []

    def check(a):
        raise UserError("--benchmarks b.jsonl does not exist.")
    with pytest.raises(SystemExit):
        run_stages(PaperArgs, {"data": lambda a: ran.append(1)}, ["--out", str(tmp_path)],
                   file="p.py", check=check)
    assert ran == []


def test_unwritable_out_is_one_sentence(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        run_stages(PaperArgs, {"data": lambda a: None}, ["--out", str(blocker / "sub")],
                   file="p.py")
    assert capsys.readouterr().err.startswith("error: cannot create the output folder")


def test_start_adapter_prefers_the_order_given(tmp_path):
    a = parse_args(PaperArgs, ["--out", str(tmp_path)])
    assert start_adapter(a, "rl", "sft") is None
    os.makedirs(tmp_path / "sft" / "adapter")
    assert start_adapter(a, "rl", "sft") is None            # an empty folder is not an adapter
    (tmp_path / "sft" / "adapter" / "adapter_config.json").write_text("{}")
    assert start_adapter(a, "rl", "sft") == str(tmp_path / "sft" / "adapter")
    os.makedirs(tmp_path / "rl" / "adapter")
    (tmp_path / "rl" / "adapter" / "adapter_config.json").write_text("{}")
    assert start_adapter(a, "rl", "sft") == str(tmp_path / "rl" / "adapter")
    assert start_adapter(a, "sft") == str(tmp_path / "sft" / "adapter")


@pytest.mark.parametrize("script", ["gog", "lras", "am3safety", "prm_bench"])
def test_every_model_flag_reaches_load_policy(script, monkeypatch):
    """--dtype / --max_pixels / --min_pixels / --gradient_checkpointing given to a script reach
    the policy it loads (common.models.run_options), not only its args.json."""
    import importlib
    mod = importlib.import_module(script)
    seen = {}

    class Stop(Exception):
        pass

    def fake_load_policy(name, **kw):
        seen.update(kw)
        raise Stop
    monkeypatch.setattr(mod, "load_policy", fake_load_policy)
    args = parse_args(mod.Args, ["--model", "tiny", "--dtype", "float32", "--max_pixels", "50176",
                                 "--min_pixels", "3136", "--no-gradient_checkpointing"])
    with pytest.raises(Stop):
        mod.get_policy(args, False) if script == "prm_bench" else mod.get_policy(args)
    assert (seen["dtype"], seen["max_pixels"], seen["min_pixels"],
            seen["gradient_checkpointing"]) == ("float32", 50176, 3136, False)
