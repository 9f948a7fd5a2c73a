"""The agents' tools: one action parser, `crop`, text search and image search.

Every paper script that lets the model act goes through this file:

- `parse_action(text, grammar)` reads the text the policy generated in one turn and returns the
  first action in it. The `Grammar` is the paper's, declared beside its script's SYSTEM prompt:
  XML tags (Search-R1 / LRAS `<search>q</search>`, MMSearch-R1 `<text_search>q</text_search>`,
  `<image_search></image_search>`, `<answer>a</answer>`) and Qwen's JSON tool calls
  (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`).
- `crop` cuts a box given in pixels of the image *as the model saw it* (after Qwen2.5-VL's
  `smart_resize`) out of the original image.
- `TextSearch` (local BM25, or an HTTP endpoint) and `ImageSearch` (local image knowledge base,
  or an HTTP endpoint).

Error policy. Bad *model output* never raises: a malformed call becomes an `Action` of kind
"error", a bad box or query becomes an observation string starting with "Error:", and the agent
loop shows it to the model. Bad *configuration* (missing file, no corpus, bad URL) raises a
ValueError / FileNotFoundError with one sentence saying what to fix.

Size: over 500 lines because crop, text search and image search each come with a local
backend and an HTTP one, and the tag grammar that parses a model's action is here too."""

from __future__ import annotations

import base64
import io
import json
import math
import numbers
import os
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from common.data import read_records, require, resolve_inside
from common.errors import UserError

# ----------------------------------------------------------------------------------------------
# Action parsing: each script declares its tag grammar beside its SYSTEM prompt
# ----------------------------------------------------------------------------------------------

ACTIONS = ("answer", "text_search", "image_search", "tool_call")
"""What a tag can mean: the final answer, a text query, a search on the current image, or a Qwen
JSON
tool call (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) whose name
`Grammar.tool_names` maps."""
TOOLS = ("crop", "text_search", "image_search")


@dataclass(frozen=True)
class Grammar:
    """The action tags one paper's prompt teaches, written beside the script's SYSTEM prompt:
        Grammar(tags={"search": "text_search", "answer": "answer"}, free=("think",))        # LRAS
    tags: tag name -> one of ACTIONS. tool_names: a <tool_call>'s "name" -> one of TOOLS.
    free: blocks whose closed content is free text (an action tag inside is not an action)."""

    tags: dict[str, str]
    tool_names: dict[str, str] = field(default_factory=dict)
    free: tuple[str, ...] = ("think",)

    def __post_init__(self):
        bad = {t: a for t, a in self.tags.items() if a not in ACTIONS}
        bad.update({n: t for n, t in self.tool_names.items() if t not in TOOLS})
        if bad or ("tool_call" in self.tags.values()) != bool(self.tool_names):
            raise ValueError(f"Grammar: tags map to {ACTIONS}, tool names to {TOOLS}, and "
                             f"tool_names "
                             f"are given exactly when a tag means tool_call; got {self.tags}, "
                             f"{self.tool_names}.")
        names = "|".join(map(re.escape, self.tags))
        object.__setattr__(self, "_tag_re", re.compile(rf"<(/?)({names})>"))
        free = "|".join(map(re.escape, self.free)) or "(?!)"
        object.__setattr__(self, "_free_re", re.compile(rf"<({free})>.*?</\1>", re.DOTALL))

    @property
    def stop_strings(self) -> list[str]:
        """The agent loop stops generation at the first of these, so one turn holds at most one
        action."""
        return [f"</{t}>" for t in self.tags]


ANSWER_ONLY = Grammar(tags={"answer": "answer"})
"""The grammar of a rollout without tools: only `<answer>` means something."""


@dataclass
class Action:
    """One parsed action. `kind` is "tool" | "answer" | "none" | "error"."""

    kind: str
    name: str | None = None  # canonical tool name: "crop" | "text_search" | "image_search"
    args: dict = field(default_factory=dict)  # crop: {"bbox_2d": [...]}; text_search: {"query"}
    answer: str | None = None  # the text inside <answer>, stripped
    error: str | None = None  # a short message for the model, starting with "Error:"


def _error(msg: str) -> Action:
    return Action(kind="error", error="Error: " + msg)


def parse_action(text: str, grammar: Grammar = ANSWER_ONLY) -> Action:
    """Return the first complete action in one turn of generated text, under the script's grammar.

    Rules (the agent loop stops at the first closing tag, so that tag names the action):
    1. Closed free blocks (`<think>...</think>`, `grammar.free`) are ignored.
    2. The earliest closing tag of the grammar picks the action; its body starts at the nearest
       opening tag of the same name before it. Anything after that closing tag is ignored.
    3. Another action tag opened before it and never closed (`<search>a <answer>b</answer>`,
       or nesting) is an error, as is a closing tag with no opening tag.
    4. No closing tag: an opened action tag is an "unclosed" error; no action tag at all is
       kind "none" (the loop re-prompts or ends the episode).
    Tags outside the grammar are plain text. Never raises on a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_action expects str, got {type(text).__name__}")
    masked = grammar._free_re.sub(" ", text)
    tags = list(grammar._tag_re.finditer(masked))
    closes = [m for m in tags if m.group(1)]
    if not closes:
        opened = [m.group(2) for m in tags]
        return _error(f"unclosed <{opened[0]}> tag.") if opened else Action(kind="none")
    close = closes[0]
    name = close.group(2)
    opens = [m for m in tags if not m.group(1) and m.start() < close.start()]
    same = [m for m in opens if m.group(2) == name]
    if not same:
        return _error(f"found </{name}> without a matching <{name}>.")
    start = same[-1]
    others = [m.group(2) for m in opens if m is not start]
    if others:
        return _error(f"<{others[0]}> was opened but not closed before </{name}>.")
    body = masked[start.end():close.start()].strip()
    meaning = grammar.tags[name]
    if meaning == "answer":
        return Action(kind="answer", answer=body)
    if meaning == "tool_call":
        return _parse_tool_call(body, grammar.tool_names)
    if meaning == "image_search":
        if body not in ("", "<img>"):
            return _error(f"<{name}> searches the current image and takes no text; write "
                          f"<{name}></{name}>.")
        return Action(kind="tool", name="image_search", args={})
    if not body:
        return _error(f"empty query in <{name}></{name}>.")
    return Action(kind="tool", name="text_search", args={"query": body})


def _parse_tool_call(body: str, tool_names: dict[str, str]) -> Action:
    """Qwen's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` body -> Action."""
    try:
        call = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int too long, deep nesting
        return _error(f"invalid JSON in <tool_call>: {str(e)[:80]}")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return _error('<tool_call> must hold {"name": ..., "arguments": {...}}.')
    name = tool_names.get(call["name"])
    if name is None:
        known = ", ".join(sorted(tool_names))
        return _error(f"unknown tool {call['name'][:40]!r}; known tools: {known}.")
    args = call.get("arguments", {})
    if not isinstance(args, dict):
        return _error('"arguments" must be a JSON object.')
    if name == "crop":
        bbox = args.get("bbox_2d")
        if not isinstance(bbox, list) or len(bbox) != 4:
            return _error('crop needs "bbox_2d": [x1, y1, x2, y2] (4 numbers).')
    if name == "text_search":
        query = args.get("query")
        if not isinstance(query, str) or not query.strip():
            return _error('text_search needs a non-empty "query" string.')
        args = {**args, "query": query.strip()}
    return Action(kind="tool", name=name, args=args)


# ----------------------------------------------------------------------------------------------
# Crop (Qwen2.5-VL coordinates)
# ----------------------------------------------------------------------------------------------

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule: (height, width) -> (h, w), both multiples of `factor`.

    Each side is rounded to a multiple of `factor`; if the area leaves [min_pixels, max_pixels]
    both sides are rescaled by one factor (aspect kept). Same code as transformers'
    `qwen2_vl.image_processing_qwen2_vl.smart_resize`; raises ValueError for aspect > 200.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image sides must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, "
                         f"got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


_PROCESSOR = None   # the image processor of the last VLM load_policy loaded (see seen_size)


def set_image_processor(image_processor) -> None:
    """Make `seen_size` / `crop` default to this processor's resize rule (load_policy calls it)."""
    global _PROCESSOR
    _PROCESSOR = image_processor


def resize_limits(image_processor) -> dict:
    """min_pixels, max_pixels and factor (= patch_size * merge_size) of a Qwen2-VL-style image
    processor, read from the processor itself (its `size` longest/shortest edge in pixels, or
    min_pixels / max_pixels attributes), never assumed."""
    size = getattr(image_processor, "size", None)
    get = (lambda k: size.get(k) if isinstance(size, dict) else getattr(size, k, None))
    lo = getattr(image_processor, "min_pixels", None) or get("shortest_edge") or get("min_pixels")
    hi = getattr(image_processor, "max_pixels", None) or get("longest_edge") or get("max_pixels")
    patch, merge = getattr(image_processor, "patch_size",
                           None), getattr(image_processor, "merge_size", None)
    if not (lo and hi and patch and merge):
        raise ValueError(f"{type(image_processor).__name__} has no Qwen2-VL resize settings "
                         f"(min/max "
                         f"pixels, patch_size, merge_size); pass min_pixels / max_pixels instead.")
    return {"min_pixels": int(lo), "max_pixels": int(hi), "factor": int(patch) * int(merge)}


def seen_size(image: Image.Image, image_processor=None, *, min_pixels: int | None = None,
              max_pixels: int | None = None) -> tuple[int, int]:
    """(w, h) of `image` as the model sees it after its image processor's resize.

    The rule's settings come from, in order: explicit min_pixels / max_pixels; the given
    `image_processor`; the processor of the VLM that load_policy loaded last; Qwen2.5-VL's
    library defaults (56*56 .. 28*28*1280, factor 28). With the published Qwen2.5-VL-3B/7B
    processor (max_pixels 12,845,056) a 1600x1200 image is seen as 1596x1204, not 1148x840."""
    ip = image_processor if image_processor is not None else _PROCESSOR
    lim = resize_limits(ip) if ip is not None else {"min_pixels": 56 * 56,
                                                    "max_pixels": 28 * 28 * 1280,
                                                    "factor": 28}
    if min_pixels is not None:
        lim["min_pixels"] = min_pixels
    if max_pixels is not None:
        lim["max_pixels"] = max_pixels
    h, w = smart_resize(image.height, image.width, **lim)
    return w, h


def _as_float(v: Any) -> float | None:
    """A finite float from a real number (not bool, not str), else None."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    try:
        f = float(v)
    except OverflowError:  # an int with hundreds of digits
        return None
    return f if math.isfinite(f) else None


def _widen(lo: int, hi: int, size: int, min_side: int) -> tuple[int, int]:
    """Grow [lo, hi) to `min_side` around its centre, shifted to stay inside [0, size)."""
    if hi - lo >= min_side:
        return lo, hi
    if size <= min_side:
        return 0, size  # the whole side; crop() upscales afterwards
    lo = (lo + hi - min_side) // 2  # same centre, rounded down
    lo = min(max(lo, 0), size - min_side)
    return lo, lo + min_side


def crop(image: Image.Image, bbox: Any, seen_size: tuple[int, int] | None = None,
         min_side: int = 28) -> tuple[Image.Image | None, str]:
    """Crop `bbox` = [x1, y1, x2, y2] (pixels of the image the model saw) from `image`.

    `seen_size` = (w, h) of the resized image the model saw (see `seen_size()`); None means the
    box is in original pixels. The box is scaled back (x * orig_w / seen_w, y * orig_h /
    seen_h), clamped to the image, and sides under `min_side` px are grown around the centre
    (DeepEyes enlarges crops under 28 px, one merged 28x28 patch); if the image itself is
    smaller, the crop is upscaled. Returns (crop, message) or (None, "Error: ...").
    """
    if image is None or image.width < 1 or image.height < 1:
        return None, "Error: there is no image to crop."
    ow, oh = image.size
    sw, sh = seen_size if seen_size is not None else (ow, oh)
    if sw < 1 or sh < 1:
        raise ValueError(f"seen_size must be a positive (w, h), got {seen_size}")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None, "Error: bbox_2d must be a list of 4 numbers [x1, y1, x2, y2]."
    coords = [_as_float(v) for v in bbox]
    if any(c is None for c in coords):
        return None, "Error: bbox_2d values must be finite numbers."
    x1, y1, x2, y2 = coords
    if x2 <= x1 or y2 <= y1:
        return None, "Error: bbox_2d needs x1 < x2 and y1 < y2."
    # (seen pixels) -> (original pixels), then clamp; the box may still be empty if it was outside
    x1, x2 = (min(max(x * ow / sw, 0.0), ow) for x in (x1, x2))
    y1, y2 = (min(max(y * oh / sh, 0.0), oh) for y in (y1, y2))
    left, top, right, bottom = math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)
    if right <= left or bottom <= top or x2 <= x1 or y2 <= y1:
        return None, f"Error: bbox_2d lies outside the {sw}x{sh} image."
    left, right = _widen(left, right, ow, min_side)
    top, bottom = _widen(top, bottom, oh, min_side)
    out = image.crop((left, top, right, bottom))
    if min(out.size) < min_side:  # the image itself is smaller than min_side: upscale
        scale = min_side / min(out.size)
        out = out.resize((max(min_side, round(out.width * scale)),
                          max(min_side, round(out.height * scale))), Image.BICUBIC)
    try:
        smart_resize(out.height, out.width)
    except ValueError as e:
        return None, f"Error: this crop cannot be shown ({e}); choose a less elongated box."
    box = f"[{left}, {top}, {right}, {bottom}]"
    return out, f"Cropped region {box} of the original {ow}x{oh} image."


# ----------------------------------------------------------------------------------------------
# HTTP backend shared by both searches
# ----------------------------------------------------------------------------------------------

class SearchError(Exception):
    """A search that could not be answered (bad query, server error). `.observe` turns it into
    an "Error: ..." observation; `.search` raises it."""


class _HttpBackend:
    """POST a JSON body to one fixed endpoint and read a size-capped JSON reply.

    The model's output never picks the URL: the endpoint is fixed here, redirects are refused,
    and proxy/.netrc settings from the environment are ignored (`trust_env=False`), so the
    request goes exactly where it was configured. `timeout` bounds the whole exchange.
    """

    def __init__(self, endpoint: str, api_key: str | None, timeout: float,
                 max_response_bytes: int):
        if not ENDPOINT_RE.match(endpoint):
            raise ValueError(f"search endpoint must be an http(s):// URL, got {endpoint!r}")
        self.endpoint, self.api_key = endpoint, api_key
        self.timeout, self.max_bytes = timeout, max_response_bytes

    def _exchange(self, payload: dict, box: dict) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        session = requests.Session()  # one per exchange: a timed-out worker may still hold its own
        session.trust_env = False
        try:
            with session, session.post(self.endpoint, json=payload, headers=headers, stream=True,
                                   timeout=self.timeout, allow_redirects=False) as r:
                box["response"] = r
                if not 200 <= r.status_code < 300:
                    raise SearchError(f"search server returned HTTP {r.status_code}")
                body = bytearray()
                for chunk in r.iter_content(chunk_size=65536):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise SearchError(f"search response larger than {self.max_bytes} bytes")
                box["body"] = bytes(body)
        except SearchError as e:
            box["error"] = e
        except requests.Timeout:
            box["error"] = SearchError(f"search timed out after {self.timeout} s")
        except (requests.RequestException, OSError, ValueError) as e:
            box["error"] = SearchError(f"search request failed ({type(e).__name__})")

    def post(self, payload: dict) -> list[dict]:
        """The whole exchange (connect, headers, body) ends within `timeout` seconds: it runs in
        a worker thread, and when the deadline passes the connection is closed and the call
        returns (requests' own timeout bounds each socket read only, so a server dripping a
        byte at a time could hold a call far longer)."""
        box: dict = {}
        worker = threading.Thread(target=self._exchange, args=(payload, box), daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():  # shut the socket so the worker's read fails; never wait for it
            conn = getattr(getattr(box.get("response"), "raw", None), "_connection", None)
            try:
                if getattr(conn, "sock", None) is not None:
                    conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            raise SearchError(f"search timed out after {self.timeout} s")
        if "error" in box:
            raise box["error"]
        body = box["body"]
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise SearchError("search server did not return JSON") from None
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list) or not all(isinstance(x, dict) for x in results):
            raise SearchError('search response must be {"results": [{...}, ...]}')
        return results


ENDPOINT_RE = re.compile(r"https?://[^/\s]+")


def check_search_inputs(text_corpus: str | None = None, image_kb: str | None = None) -> None:
    """The search sources a user gave, checked before any model loads: TEXT_SEARCH_ENDPOINT /
    IMAGE_SEARCH_ENDPOINT are http(s) URLs, each text-corpus row has text, each image-KB row a
    name and an image file inside the KB's folder (as every other reader confines its paths)."""
    for env in ("TEXT_SEARCH", "IMAGE_SEARCH"):
        url = os.environ.get(f"{env}_ENDPOINT")
        if url and not ENDPOINT_RE.match(url):
            raise UserError(f"{env}_ENDPOINT must be an http(s):// URL, not {url!r}; "
                            f"set it to your search service or unset it.")
    if text_corpus:
        for where, row in read_records(text_corpus, "text corpus"):
            if not isinstance(row.get("text", row.get("contents")), str):
                raise UserError(f"{where}: the record lacks 'text' (or Search-R1's 'contents'), "
                                f"the document to search (it has "
                                f"{', '.join(map(repr, row)) or 'no fields'}).")
    if image_kb:
        for where, row in read_records(image_kb, "image KB"):
            require(row, where, "image", "name")
            resolve_inside(Path(image_kb).parent, row["image"], where)


def _backend(endpoint: str | None, api_key: str | None, use_env: bool, env: str,
             timeout: float, max_response_bytes: int) -> _HttpBackend | None:
    """The HTTP backend if an endpoint is given (or, with use_env, set in `{env}_ENDPOINT`)."""
    if use_env:
        endpoint = endpoint or os.environ.get(f"{env}_ENDPOINT")
        api_key = api_key or os.environ.get(f"{env}_API_KEY")
    return _HttpBackend(endpoint, api_key, timeout, max_response_bytes) if endpoint else None


# ----------------------------------------------------------------------------------------------
# Text search: Okapi BM25 over a local corpus
# ----------------------------------------------------------------------------------------------

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")


def tokenize(text: str) -> list[str]:
    """Lowercased unicode words; each CJK character is its own token (Chinese has no spaces)."""
    return _TOKEN_RE.findall(text.lower())


class TextSearch:
    """Okapi BM25 over local documents, or an HTTP search endpoint.

    score(q, d) = sum over distinct query terms t of
        IDF(t) * f(t, d) * (k1 + 1) / (f(t, d) + k1 * (1 - b + b * |d| / avgdl)),
        IDF(t) = ln((N - n(t) + 0.5) / (n(t) + 0.5) + 1)
    with f(t, d) the count of t in d, |d| the token count, N the number of documents and n(t)
    the number that contain t (the "+1" keeps IDF positive, as in Lucene).

    HTTP: POST {"query": q, "k": k} to `endpoint`, expect {"results": [{"id", "text", "score"}]};
    `api_key` goes in an "Authorization: Bearer" header. With `use_env=True`, a None endpoint /
    api_key is read from TEXT_SEARCH_ENDPOINT / TEXT_SEARCH_API_KEY. Give documents or an
    endpoint, not both (ValueError). `.search` raises SearchError for a bad query or a failed
    request; `.observe` never raises.
    """

    def __init__(self, docs: list[dict] | list[str] | None = None, *, k1: float = 1.5,
                 b: float = 0.75, max_query_chars: int = 512, endpoint: str | None = None,
                 api_key: str | None = None, use_env: bool = False, timeout: float = 10.0,
                 max_response_bytes: int = 1_000_000):
        self.k1, self.b, self.max_query_chars = k1, b, max_query_chars
        self.http = _backend(endpoint, api_key, use_env, "TEXT_SEARCH", timeout,
                             max_response_bytes)
        if (docs is None) == (self.http is None):
            raise ValueError("TextSearch needs exactly one backend: documents or an endpoint "
                             "(endpoint=... or TEXT_SEARCH_ENDPOINT with use_env=True).")
        if self.http is None:
            self._index([_as_doc(d, i) for i, d in enumerate(docs)])

    @classmethod
    def from_jsonl(cls, path: str | Path, **kwargs: Any) -> TextSearch:
        """One JSON object per line with "text" (or Search-R1's "contents") and optional "id"."""
        return cls(_read_jsonl(path), **kwargs)

    def _index(self, docs: list[dict]) -> None:
        if not docs:
            raise ValueError("TextSearch got an empty corpus; give at least one document.")
        self.docs = docs
        counts = [Counter(tokenize(d["text"])) for d in docs]
        self.doc_len = [sum(c.values()) for c in counts]
        self.avgdl = max(sum(self.doc_len) / len(docs), 1e-9)
        self.postings: dict[str, list[tuple[int, int]]] = {}  # term -> [(doc index, f(t, d))]
        for i, c in enumerate(counts):
            for term, f in c.items():
                self.postings.setdefault(term, []).append((i, f))
        n_docs = len(docs)
        self.idf = {t: math.log((n_docs - len(p) + 0.5) / (len(p) + 0.5) + 1)
                    for t, p in self.postings.items()}

    def _check_query(self, query: Any) -> str:
        if not isinstance(query, str) or not query.strip():
            raise SearchError("empty search query.")
        if len(query) > self.max_query_chars:
            raise SearchError(f"search query longer than {self.max_query_chars} characters.")
        return query.strip()

    def search(self, query: str, k: int = 3) -> list[dict]:
        """Top-k hits, best first: [{"id", "text", "score"}] (local: only score > 0)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        query = self._check_query(query)
        if self.http is not None:
            hits = self.http.post({"query": query, "k": k})[:k]
            if not all(isinstance(h.get("text"), str) for h in hits):
                raise SearchError('every search result needs a "text" string')
            return [{"id": str(h.get("id", i)), "text": h["text"],
                     "score": _as_float(h.get("score"))} for i, h in enumerate(hits)]
        scores: dict[int, float] = {}
        for term in set(tokenize(query)):
            for i, f in self.postings.get(term, []):
                norm = self.k1 * (1 - self.b + self.b * self.doc_len[i] / self.avgdl)
                scores[i] = scores.get(i, 0.0) + self.idf[term] * f * (self.k1 + 1) / (f + norm)
        best = sorted((i for i in scores if scores[i] > 0), key=lambda i: (-scores[i], i))[:k]
        return [{**self.docs[i], "score": scores[i]} for i in best]

    def observe(self, query: str, k: int = 3) -> str:
        """Hits as text, Search-R1 style ("Doc 1(Title: ...) ..."), or "Error: ..."."""
        try:
            hits = self.search(query, k)
        except SearchError as e:
            return f"Error: {e}"
        if not hits:
            return "No results found."
        return "\n".join(f"Doc {i}(Title: {h.get('title') or h['id']}) {h['text']}"
                         for i, h in enumerate(hits, 1))


def _as_doc(d: dict | str, i: int) -> dict:
    if isinstance(d, str):
        return {"id": str(i), "text": d}
    text = d.get("text", d.get("contents")) if isinstance(d, dict) else None
    if not isinstance(text, str):
        raise ValueError(f'document {i} needs a "text" string, got {str(d)[:80]!r}')
    doc = {"id": str(d.get("id", i)), "text": text}
    if d.get("title"):
        doc["title"] = str(d["title"])
    return doc


def _read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a JSONL file.")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e}).") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line.")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Image search: cosine nearest neighbour over a tiny handcrafted embedding
# ----------------------------------------------------------------------------------------------

def embed_image(image: Image.Image) -> np.ndarray:
    """An 893-d unit vector: [16x16 RGB thumbnail, mean removed, unit norm] ++
    [5x5x5 RGB colour histogram, unit norm], divided by sqrt(2). Layout + colour, no network.

    Histogram levels per channel are centred on 0, 64, 128, 192, 255 (edges at 32 + 64k), so
    the flat colours of procedural images do not sit on a bin edge where noise splits them.
    """
    rgb = image.convert("RGB")
    thumb = np.asarray(rgb.resize((16, 16), Image.BILINEAR), dtype=np.float64).ravel() / 255
    thumb -= thumb.mean()  # (768,)
    small = np.asarray(rgb.resize((64, 64), Image.BILINEAR), dtype=np.int64).reshape(-1, 3)
    pixels = (small + 32) // 64  # (4096, 3) levels 0..4
    hist = np.bincount(pixels[:, 0] * 25 + pixels[:, 1] * 5 + pixels[:, 2], minlength=125)
    hist = hist.astype(np.float64)  # (125,)
    parts = [v / max(np.linalg.norm(v), 1e-12) for v in (thumb, hist)]
    return np.concatenate(parts) / math.sqrt(2)


class ImageSearch:
    """Nearest neighbours in a local image knowledge base, or an HTTP endpoint.

    Entries are (image, name, caption) tuples or {"image", "name", "caption"} dicts; image is a
    PIL image or a path. Score = cosine similarity of `embed_image` vectors.
    HTTP: POST {"image": base64 PNG, "k": k}, expect {"results": [{"name", "caption", "score"}]};
    same guards and env rule as `TextSearch` (IMAGE_SEARCH_ENDPOINT / IMAGE_SEARCH_API_KEY).
    `.search` raises SearchError for a missing image or a failed request; `.observe` never raises.
    """

    def __init__(self, entries: list | None = None, *, endpoint: str | None = None,
                 api_key: str | None = None, use_env: bool = False, timeout: float = 10.0,
                 max_response_bytes: int = 1_000_000):
        self.http = _backend(endpoint, api_key, use_env, "IMAGE_SEARCH", timeout,
                             max_response_bytes)
        if (entries is None) == (self.http is None):
            raise ValueError("ImageSearch needs exactly one backend: entries or an endpoint "
                             "(endpoint=... or IMAGE_SEARCH_ENDPOINT with use_env=True).")
        if self.http is None:
            if not entries:
                raise ValueError("ImageSearch got an empty knowledge base; give an entry.")
            self.entries = [_as_entry(e, i) for i, e in enumerate(entries)]
            self.vectors = np.stack([embed_image(e["image"]) for e in self.entries])  # (N, 893)

    @classmethod
    def from_jsonl(cls, path: str | Path, **kwargs: Any) -> ImageSearch:
        """Lines {"image": path relative to the JSONL file, "name", "caption"}."""
        rows = _read_jsonl(path)
        for i, row in enumerate(rows):   # confined to the KB's folder, like every data reader
            if isinstance(row.get("image"), str):
                row["image"] = resolve_inside(Path(path).parent, row["image"], f"{path}: entry {i}")
        return cls(rows, **kwargs)

    def search(self, image: Image.Image, k: int = 1) -> list[dict]:
        """Top-k entries, best first: [{"name", "caption", "score"}]."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if image is None or image.width < 1 or image.height < 1:
            raise SearchError("there is no image to search with.")
        if self.http is not None:
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
            hits = self.http.post({"image": base64.b64encode(buf.getvalue()).decode(), "k": k})[:k]
            return [{"name": str(h.get("name", "")), "caption": str(h.get("caption", "")),
                     "score": _as_float(h.get("score"))} for h in hits]
        sims = self.vectors @ embed_image(image)  # (N,)
        best = np.argsort(-sims, kind="stable")[:k]
        return [{"name": self.entries[i]["name"], "caption": self.entries[i]["caption"],
                 "score": float(sims[i])} for i in best]

    def observe(self, image: Image.Image, k: int = 1) -> str:
        """Hits as text for the model ("Image 1(Title: name) caption"), or "Error: ..."."""
        try:
            hits = self.search(image, k)
        except SearchError as e:
            return f"Error: {e}"
        if not hits:
            return "No results found."
        return "\n".join(f"Image {i}(Title: {h['name']}) {h['caption']}"
                         for i, h in enumerate(hits, 1))


def _as_entry(e: Any, i: int) -> dict:
    if isinstance(e, (tuple, list)) and len(e) == 3:
        e = dict(zip(("image", "name", "caption"), e))
    if not isinstance(e, dict) or "image" not in e or "name" not in e:
        raise ValueError(f"image KB entry {i} must be (image, name, caption) or such a dict.")
    image = e["image"]
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image KB entry {i}: {image} does not exist.")
        image = Image.open(image)
        image.load()
    if not isinstance(image, Image.Image):
        raise ValueError(f"image KB entry {i}: image must be a PIL image or a path.")
    return {"image": image, "name": str(e["name"]), "caption": str(e.get("caption", ""))}
