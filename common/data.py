"""One reader for every user data file: benchmark exports, corpora, seeds, predictions.

    rows = read_records("lawbench.json")        # [("lawbench.json:3", {...}), ...]
    img = open_image(row["image"], base_dir=Path("lawbench.json").parent, where="lawbench.json:3")

Formats, decided by content and suffix:
  .json   a JSON array of objects, one object, or JSON lines (LexEval ships JSON lines as `.json`)
  .jsonl  JSON lines (blank lines skipped)
  .csv    a header row; each later row is a dict of strings
  .parquet  via pyarrow (what `datasets` uses); embedded images stay as {"bytes": ..., "path": ...}
Encodings: UTF-8 (with or without BOM); otherwise GB18030 (a superset of GBK, which Chinese legal
exports use) when the whole file decodes as it into mostly CJK text, announced in one line;
otherwise one sentence naming the file, the byte and the conversion to run.

Every problem is a `UserError` whose sentence names `file:line` (or `file:row N` / `file:item N`),
so the script can fail before it loads a model. Each script maps fields to its own schema.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

from common.errors import UserError

MAX_IMAGE_PIXELS = 64_000_000   # larger images are refused (decompression bombs): 8k x 8k


def read_text(path: str | Path, what: str = "data file") -> str:
    """The file's text: UTF-8, else GB18030 (announced) when that gives mostly CJK text, else a
    UserError naming the byte and the conversion to run."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no {what} at {p}" + (" (it is a folder)." if p.is_dir() else "."))
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:   # utf-8-sig counts from after the BOM: offset in the file
        bad = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
    try:
        text = raw.decode("gb18030")
    except UnicodeDecodeError:
        text = None
    # GB18030 decodes most byte strings (a Latin-1 "é" and the letter after it become one CJK
    # character): trust it only when most non-ASCII characters it gives are CJK and most of
    # those stand beside no Latin letter, as in a Chinese legal export
    text = text or ""
    cjk = [i for i, c in enumerate(text) if _is_cjk(c)]
    glued = sum(any(0 <= j < len(text) and text[j].isascii() and text[j].isalpha()
                    for j in (i - 1, i + 1)) for i in cjk)
    wide = sum(ord(c) > 127 for c in text)
    if not cjk or len(cjk) < 0.8 * wide or glued > 0.5 * len(cjk):
        raise UserError(f"{p} is not UTF-8 (invalid byte 0x{raw[bad]:02x} at offset {bad}) "
                        f"nor GB18030; convert it, e.g. "
                        f"`iconv -f latin1 -t UTF-8 {p.name} > fixed{p.suffix}` (name its real "
                        f"encoding after -f).")
    print(f"[data] {p} is not UTF-8; read it as GB18030 (GBK).")
    return text


def _is_cjk(c: str) -> bool:
    """CJK ideographs, kana, Hangul and CJK / full-width punctuation."""
    o = ord(c)
    return (0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF
            or 0xFE30 <= o <= 0xFE4F or 0xFF00 <= o <= 0xFFEF or 0x20000 <= o <= 0x2FA1F)


def read_records(path: str | Path, what: str = "data file") -> list[tuple[str, dict]]:
    """[(where, row)] for each record of a JSON / JSON-lines / CSV / parquet file; `where` is
    `file:line` (JSON lines, CSV), `file:item N` (JSON array) or `file:row N` (parquet)."""
    p = Path(path)
    if p.suffix == ".parquet":
        return _parquet(p, what)
    text = read_text(p, what)
    if p.suffix == ".csv":
        rows = _csv(p, text)
    else:
        rows = _json(p, text)
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object (a record with fields), "
                            f"got {type(row).__name__}.")
    if not rows:
        raise UserError(f"the {what} {p} holds no records.")
    return rows


def _json(p: Path, text: str) -> list[tuple[str, object]]:
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{e.lineno}: not valid JSON ({e.msg}).") from None
        return [(f"{p}:item {i}", r) for i, r in enumerate(items, 1)]
    try:  # one object spread over several lines
        return [(f"{p}:1", json.loads(text))]
    except json.JSONDecodeError:
        pass
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{p}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{lineno}: not valid JSON ({e.msg}).") from None
    return rows


def _csv(p: Path, text: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise UserError(f"{p}: a CSV file needs a header row.")
    rows = []
    for row in reader:
        where = f"{p}:{reader.line_num}"
        if None in row:
            raise UserError(f"{where}: more cells "
                            f"than the {len(reader.fieldnames)} header columns.")
        rows.append((where, {k: (v if v is not None else "") for k, v in row.items()}))
    strict, done = csv.reader(io.StringIO(text), strict=True), 0
    try:   # the lenient reader takes an unclosed quote as one cell that runs to the end of file
        for _ in strict:
            done = strict.line_num   # the last line of the rows read so far
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise UserError(f"{p}:{done + 1}: a quote (\") opened on this row is "
                            f"never closed; close it or double a quote inside a cell "
                            f"(\"\").") from None
    return rows


def _parquet(p: Path, what: str) -> list[tuple[str, dict]]:
    if not p.is_file():
        raise UserError(f"no {what} at {p}.")
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise UserError(f"{p}: not a readable parquet file "
                        f"({type(e).__name__}: {str(e)[:120]}).") from None
    rows = [(f"{p}:row {i}", r) for i, r in enumerate(table.to_pylist(), 1)]
    if not rows:
        raise UserError(f"the {what} {p} holds no records.")
    return rows


def require(row: dict, where: str, *fields: str) -> None:
    """One sentence naming the record and the fields it lacks."""
    missing = [f for f in fields if row.get(f) in (None, "", [])]
    if missing:
        raise UserError(f"{where}: the record lacks {', '.join(repr(f) for f in missing)} "
                        f"(it has {', '.join(map(repr, row)) or 'no fields'}).")


def unique_ids(rows: list[tuple[str, object]], what: str = "id") -> None:
    """rows: [(where, id)]; one sentence naming both rows of the first id given twice."""
    seen: dict[str, str] = {}
    for where, rid in rows:
        if str(rid) in seen:
            raise UserError(f"{seen[str(rid)]} and {where} both have the {what} {str(rid)!r}; "
                            f"give each {what} one row.")
        seen[str(rid)] = where


def safe_name(rid: object) -> str:
    """A record id as a file name inside its folder: an id of letters, digits, `-`, `_` and inner
    dots stays as it is; any other becomes those characters plus a hash of the id (so `../../x`
    stays in its folder, and two ids never share a file)."""
    rid = str(rid)
    clean = re.sub(r"[^\w.-]", "_", rid).lstrip(".")[:80]
    if clean == rid and rid:
        return rid
    return f"{clean}-{hashlib.sha1(rid.encode()).hexdigest()[:8]}"


def resolve_inside(base_dir: str | Path, rel: str, where: str) -> Path:
    """`base_dir / rel`, refusing any path that leaves `base_dir`
    (`../../etc/passwd`, absolute paths elsewhere)."""
    base = Path(base_dir).resolve()
    full = (base / str(rel)).resolve()
    if full != base and base not in full.parents:
        raise UserError(f"{where}: the path {rel!r} leaves the data folder {base}; "
                        f"keep files inside it.")
    if not full.is_file():
        raise UserError(f"{where}: the file {full} does not exist.")
    return full


def open_image(value, base_dir: str | Path, where: str):
    """A PIL RGB image from a path inside `base_dir`, raw bytes, or a parquet/datasets cell
    {"bytes": ..., "path": ...}. A non-image, a broken file or an image over MAX_IMAGE_PIXELS
    is a UserError naming the file and row."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(value, dict) and value.get("bytes"):
        value = value["bytes"]
    elif isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (bytes, bytearray)):
        src, name = io.BytesIO(value), f"the embedded image at {where}"
    elif isinstance(value, str) and value:
        src = resolve_inside(base_dir, value, where)
        name = f"{src} ({where})"
    else:
        raise UserError(f"{where}: expected an image path or image bytes, "
                        f"got {type(value).__name__}.")
    try:
        with Image.open(src) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise UserError(f"{name} is {im.width}x{im.height} pixels, "
                                f"over the {MAX_IMAGE_PIXELS:,} allowed "
                                f"(a decompression bomb?); resize it.")
            return im.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as e:
        raise UserError(f"{name} is not a readable image ({type(e).__name__}).") from None
