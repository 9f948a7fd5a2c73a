"""The command line of common.assignments: list | make NAME --out DIR | check [NAME ...]."""
import argparse
import sys
from pathlib import Path

from common.assignments import ASSIGNMENTS, check, get, listing, make
from common.errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.assignments",
                                 description="Course assignments made from the reference code.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the assignments, their parts and points")
    mk = sub.add_parser("make", help="a student copy with the assignment's functions stubbed")
    mk.add_argument("name", help=", ".join(ASSIGNMENTS))
    mk.add_argument("--out", required=True, help="a new (or empty) folder")
    ck = sub.add_parser("check", help="graders pass on this tree and fail on stubbed copies")
    ck.add_argument("names", nargs="*", help="default: all")
    args = ap.parse_args(argv)
    try:
        if args.command == "list":
            print(listing())
        elif args.command == "make":
            out = make(args.name, Path(args.out))
            a = get(args.name)
            n = len(a.parts)
            print(f"{out}: the repository with {n} function{'s' * (n != 1)} stubbed "
                  f"({', '.join(p.name for p in a.parts)}); grade with:\n"
                  f"  cd {out} && python -m pytest {a.tests}\n"
                  f"handout: docs/assignments/{a.name}.md")
        else:
            defects = check(args.names or None)
            for d in defects:
                print(f"DEFECT {d}")
            print("check: ok" if not defects else f"check: {len(defects)} defects")
            return 1 if defects else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
