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
    a = parse_args(Args, ["--beta", "0.5", "--load_in_4bit", "false", "--no-lora", "--num-generations", "8"])
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
