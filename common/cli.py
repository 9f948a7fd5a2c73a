"""A dataclass `Args` -> command line, CleanRL style: the docstring under each field is its help.

    @dataclass
    class Args:
        beta: float = 0.001
        \"\"\"KL coefficient (GoG: 0.001)\"\"\"
    args = parse_args(Args)          # python gog.py --beta 0.01   (or --beta=0.01)

Booleans get `--flag` / `--no-flag`; `Literal[...]` fields get choices; `X | None` fields
accept the word `none`. Field names keep TRL's spelling (`--num_generations`); the dashed form
(`--num-generations`) works too.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing


def field_docs(cls) -> dict[str, str]:
    """{field: the string literal right under it} from the class source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for a, b in zip(body, body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(getattr(b, "value", None), ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


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
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)][0]
        base, choices, is_bool = _parser_for(inner)
        base = _bool if is_bool else base
        return (lambda s: None if s.lower() == "none" else base(s)), choices, False
    if tp is bool:
        return bool, None, True
    return tp, None, False


def parse_args(cls, argv: list[str] | None = None, description: str | None = None):
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ, choices, is_bool = _parser_for(hints[f.name])
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        help_ = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if is_bool:
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=default, help=help_)
        else:
            p.add_argument(*names, dest=f.name, type=typ, choices=choices, default=default, help=help_)
    return cls(**vars(p.parse_args(argv)))
