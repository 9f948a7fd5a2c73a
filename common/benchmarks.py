"""Readers for the published benchmark files the five papers report on, each converted to its
script's own record format. Plumbing, not the papers' ideas: each reader maps one published
schema (field names, answer markers, image layout) onto the script's records, reading the file
with `common.data.read_records` and failing with `file:line` sentences. A scorer that is a
benchmark's own official code (InfoSeek's numeric ranges, MMSearch's token F1, ...) may live here
too, as a small function written from that code; each script keeps a visible table of which
fields and which rule score each of its benchmarks, next to the numbers it produces.

One section per script, in the order of the README.
"""
from __future__ import annotations

# =============================================================================================
# gog.py: visual search QA (FVQA, InfoSeek, MMSearch, SimpleVQA, LiveVQA, DynVQA)
# =============================================================================================
import base64
import json
from pathlib import Path

from common.cli import UserError
from common.data import open_image, read_records, require


def field_at(row: dict, path: str):
    """`a.b` reads a nested field; None when any step is missing."""
    for key in path.split("."):
        row = row.get(key) if isinstance(row, dict) else None
    return row


def as_list(v) -> list:
    """Golds as a list: a list, a JSON-encoded list (FVQA's candidate_answers), a string, or nothing."""
    if isinstance(v, str) and v.strip().startswith("["):
        try:
            v = json.loads(v)
        except ValueError:
            pass
    return [] if v is None or v == "" else list(v) if isinstance(v, (list, tuple)) else [v]


def question_text(v, where: str) -> str:
    """FVQA's prompt is a chat list: its last user message; other benchmarks hold a string."""
    if isinstance(v, (list, tuple)):
        v = next((m.get("content") for m in reversed(v) if isinstance(m, dict) and m.get("role") == "user"), None)
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"{where}: the question field is empty or not text.")
    return v.replace("<image>", "").strip()


def resolve_image(v, name: str, where: str, base: Path, image_dir: str | None, is_id: bool = False):
    """Embedded bytes (or base64), a path inside the data folder, an id (is_id: InfoSeek's OVEN ids)
    or a URL: the last two name a file in `image_dir` (`<id>.<ext>` or the URL's file name)."""
    v = (v or [None])[0] if isinstance(v, list) else v
    if isinstance(v, str) and len(v) > 1024:  # a base64-encoded image (SimpleVQA JSON), not a path
        v = base64.b64decode(v)
    if v is None or not (isinstance(v, str) and (v.startswith(("http://", "https://")) or is_id)):
        return None if v is None else open_image(v, base, where)
    key = v.rsplit("/", 1)[-1].split("?")[0] if "://" in v else v
    if not image_dir:
        raise UserError(f"{where}: {name} image {v[:80]!r} is remote or an id; download the images into a "
                        f"folder and pass --image_dir.")
    found = [p for p in (Path(image_dir) / key, *Path(image_dir).glob(key + ".*")) if p.is_file()]
    if not found:
        raise UserError(f"{where}: no file for image {key!r} in --image_dir {image_dir}.")
    return open_image(found[0].name, image_dir, where)


def split_items(rows: list[tuple[str, dict]], keys: list[str]) -> list[tuple[str, dict]]:
    """LiveVQA items hold several questions (level1_qa, level2_qa) on one image: one record each,
    id `<id>-<key>`, options appended to the question."""
    out = []
    for where, r in rows:
        for key in keys:
            qa = r.get(key)
            if isinstance(qa, dict):
                opts = " ".join(str(o) for o in qa.get("options") or [])
                out.append((f"{where} {key}", dict(qa, id=f"{r.get('id')}-{key}", img_path=r.get("img_path"), level=key,
                                                   question=f"{qa.get('question', '')} {opts}".strip())))
    return out


def read_visual_qa(name: str, path: str, spec: dict, image_dir: str | None = None) -> list[dict]:
    """Records of one benchmark file in its published schema, as gog.py's field map `spec` names its
    fields -> {"id", "question", "image", "answers", "golds", "split", "benchmark"}."""
    rows = read_records(path, f"{name} file")
    rows = split_items(rows, spec["items"]) if spec.get("items") else rows
    out = []
    for where, r in rows:
        require(r, where, spec["id"], spec["question"])
        golds = [g for f in spec["golds"] for g in as_list(field_at(r, f))]
        if not golds:
            raise UserError(f"{where}: no gold answer in {', '.join(spec['golds'])}.")
        answers = [str(g.get("wikidata", g.get("range"))) if isinstance(g, dict) else str(g) for g in golds]
        image = resolve_image(field_at(r, spec["image"]), name, where, Path(path).parent, image_dir, spec.get("image_is_id"))
        out.append({"id": str(field_at(r, spec["id"])), "benchmark": name, "kind": name, "golds": golds,
                    "answers": answers, "question": question_text(field_at(r, spec["question"]), where),
                    "split": str(field_at(r, spec["split"])) if spec["split"] else "all", "image": image,
                    "target": None, "target_box": None})
    return out
