# Run: pytest tests/test_tools.py -q
"""Tests for common/tools.py: action parsing, crop coordinates, BM25, HTTP guards, image search."""

import base64
import io
import json
import math
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image, ImageDraw

from common.tools import (ANSWER_ONLY, Grammar, ImageSearch, SearchError, TextSearch, crop,
                          parse_action,
                          seen_size, smart_resize, tokenize)
from helpers import all_tags_grammar

# ----------------------------------------------------------------------------------------------
# parse_action
# ----------------------------------------------------------------------------------------------
G = all_tags_grammar()   # every tag style the scripts use; each script declares its own subset


@pytest.mark.parametrize("text, kind, name, args, answer", [
    ("<think>need facts</think><search>capital of France</search>", "tool", "text_search",
     {"query": "capital of France"}, None),
    ("<reason>hmm</reason><text_search> Eiffel tower height </text_search>", "tool", "text_search",
     {"query": "Eiffel tower height"}, None),
    ("<image_search></image_search>", "tool", "image_search", {}, None),
    ("<image_search><img></image_search>", "tool", "image_search", {}, None),
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 110, 220]}}'
     '</tool_call>', "tool", "crop", {"bbox_2d": [10, 20, 110, 220]}, None),
    ('<tool_call>\n{"name": "crop", "arguments": {"bbox_2d": [1, 2, 3, 4], "label": "sign"}}\n'
     '</tool_call>', "tool", "crop", {"bbox_2d": [1, 2, 3, 4], "label": "sign"}, None),
    ('<tool_call>{"name": "search", "arguments": {"query": "合同法 第52条"}}</tool_call>', "tool",
     "text_search", {"query": "合同法 第52条"}, None),
    ('<tool_call>{"name": "image_search", "arguments": {}}</tool_call>', "tool", "image_search",
     {}, None),
    ("<think>It is Paris.</think>\n<answer> Paris </answer>", "answer", None, {}, "Paris"),
    ("I am not sure yet.", "none", None, {}, None),
    ("", "none", None, {}, None),
    ("<think>I could <search> later</think> still thinking", "none", None, {}, None),
])
def test_parse_action_styles(text, kind, name, args, answer):
    a = parse_action(text, G)
    assert (a.kind, a.name, a.args, a.answer) == (kind, name, args, answer)
    assert a.error is None


def test_first_action_wins():
    a = parse_action("<search>first</search><answer>second</answer>", G)
    assert (a.kind, a.args) == ("tool", {"query": "first"})
    a = parse_action('<answer>42</answer><tool_call>{"name": "crop", "arguments": '
                     '{"bbox_2d": [0, 0, 5, 5]}}</tool_call>', G)
    assert (a.kind, a.answer) == ("answer", "42")
    assert set(G.stop_strings) == {"</search>", "</text_search>", "</image_search>", "</tool_call>",
                                   "</answer>"}


@pytest.mark.parametrize("text, needle", [
    ("<search>no closing tag", "unclosed <search>"),
    ("<answer>Paris", "unclosed <answer>"),
    ("</answer>", "without a matching <answer>"),
    ("<search>a <answer>b</answer>", "<search> was opened"),
    ("<answer><search>x</search></answer>", "<answer> was opened"),
    ("<search>   </search>", "empty query"),
    ("<image_search>the tower</image_search>", "takes no text"),
    ("<tool_call>{\"name\": \"crop\", \"arguments\": {\"bbox_2d\": [1, 2</tool_call>",
     "invalid JSON"),
    ("<tool_call>[1, 2]</tool_call>", '"name"'),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "unknown tool"),
    ('<tool_call>{"name": "crop", "arguments": [1, 2, 3, 4]}</tool_call>', "JSON object"),
    ('<tool_call>{"name": "crop", "arguments": "{\\"bbox_2d\\": [1,2,3,4]}"}</tool_call>',
     "JSON object"),
    ('<tool_call>{"name": "crop", "arguments": {"bbox_2d": [1, 2, 3]}}</tool_call>', "4 numbers"),
    ('<tool_call>{"name": "crop", "arguments": {}}</tool_call>', "4 numbers"),
    ('<tool_call>{"name": "search", "arguments": {"query": 7}}</tool_call>', "query"),
    ("<tool_call>" + "[" * 100_000 + "</tool_call>", "invalid JSON"),
    ('<tool_call>{"name": "crop", "arguments": {"bbox_2d": [' + "9" * 5000
     + ", 1, 2, 3]}}</tool_call>",
     "invalid JSON"),
])
def test_parse_action_errors(text, needle):
    a = parse_action(text, G)
    assert a.kind == "error"
    assert a.error.startswith("Error: ") and needle in a.error


def test_parse_action_fuzz():
    rng = random.Random(0)
    pieces = ["<search>", "</search>", "<text_search>", "</text_search>", "<image_search>",
              "</image_search>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "<think>",
              "</think>", "<reason>", "</reason>", "<img>", "<", ">", "/", "{", "}", "[", "]", '"',
              ":", ",", '"name"', '"arguments"', '"bbox_2d"', '"crop"', '"image_zoom_in_tool"',
              '"search"', '"query"', "1e999", "-1e999", "NaN", "Infinity", "9" * 400, "null",
              "None", "true", "0", "-3.5", "巴黎", "合同", "é", "\u202e", "\x00", "😀", " ", "\n",
              '{"name": "crop", "arguments": {"bbox_2d": [',
              '{"name": "search", "arguments": {"query": "']
    kinds = {"tool", "answer", "none", "error"}
    for _ in range(1000):
        if rng.random() < 0.2:  # raw random unicode
            text = "".join(chr(rng.randrange(0, 0x2FFFF)) for _ in range(rng.randrange(0, 40)))
            text = text.encode("utf-8", "replace").decode("utf-8", "replace")
        else:
            text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 25)))
        a = parse_action(text, G)
        assert a.kind in kinds
        if a.kind == "error":
            assert isinstance(a.error, str) and a.error.startswith("Error: ")
        if a.kind == "tool":
            assert a.name in {"crop", "text_search", "image_search"} and isinstance(a.args, dict)
        if a.kind == "answer":
            assert isinstance(a.answer, str)


def test_each_script_grammar_reads_only_its_own_tags():
    lras = Grammar(tags={"search": "text_search", "answer": "answer"})      # LRAS / Search-R1
    # a tag outside the grammar is plain text: no action, no error, no stop string
    assert parse_action("<text_search>q</text_search>", lras).kind == "none"
    assert parse_action("<text_search>q</text_search><search>law 5</search>",
                        lras).args == {"query": "law 5"}
    assert lras.stop_strings == ["</search>", "</answer>"]
    # without tools only <answer> counts (single-turn replies, dialogues)
    assert parse_action("<search>x</search> <answer>y</answer>", ANSWER_ONLY).answer == "y"
    # a <tool_call> name outside the grammar's tool names is an error the model sees
    gaze = Grammar(tags={"tool_call": "tool_call", "answer": "answer"}, tool_names={"crop": "crop"})
    a = parse_action('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, '
                     '4]}}</tool_call>', gaze)
    assert a.kind == "error" and "known tools: crop" in a.error
    # free blocks are the grammar's: <reason> is free text only where the paper says so
    assert parse_action("<reason><answer>a</answer></reason>",
                        Grammar(tags={"answer": "answer"}, free=("reason",))).kind == "none"
    assert parse_action("<reason><answer>a</answer></reason>", lras).answer == "a"


@pytest.mark.parametrize("tags, names", [({"go": "jump"}, {}), ({"tool_call": "tool_call"}, {}),
                                         ({"answer": "answer"}, {"crop": "crop"}),
                                         ({"tool_call": "tool_call"}, {"zoom": "rotate"})])
def test_grammar_rejects_meanings_the_parser_does_not_have(tags, names):
    with pytest.raises(ValueError, match="Grammar"):
        Grammar(tags=tags, tool_names=names)


def test_parse_action_rejects_non_text():
    with pytest.raises(TypeError):
        parse_action(None)


# ----------------------------------------------------------------------------------------------
# smart_resize and crop
# ----------------------------------------------------------------------------------------------


def _hf_smart_resize():
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf
        hf(56, 56)  # without torchvision this module raises on first use
    except ImportError:  # the PIL-backend module holds a "Copied from" twin of the same function
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf
    return hf


def test_smart_resize_matches_transformers():
    hf = _hf_smart_resize()
    sides = [1, 13, 14, 27, 28, 29, 42, 55, 56, 57, 100, 224, 333, 480, 640, 1000, 1080, 1920, 4000]
    for min_px, max_px in [(56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 1280 * 28 * 28),
                           (3136, 200_000)]:
        for h in sides:
            for w in sides:
                if max(h, w) / min(h, w) > 200:
                    with pytest.raises(ValueError):
                        smart_resize(h, w, min_pixels=min_px, max_pixels=max_px)
                    continue
                assert smart_resize(h, w, min_pixels=min_px, max_pixels=max_px) == \
                    hf(h, w, min_pixels=min_px, max_pixels=max_px)
    assert smart_resize(480, 640) == (476, 644)  # qwen25vl.md: 640x480 -> 644x476


@pytest.mark.parametrize("size, max_pixels", [
    ((640, 480), 28 * 28 * 1280), ((1000, 300), 28 * 28 * 1280), ((300, 1000), 28 * 28 * 1280),
    ((2000, 1500), 28 * 28 * 1280), ((2000, 1500), 256 * 28 * 28), ((40, 30), 28 * 28 * 1280),
    ((777, 333), 128 * 28 * 28)])
def test_crop_round_trip(size, max_pixels):
    """Draw a red rectangle, give its box in the model's (resized) pixels, get it back."""
    w, h = size
    img = Image.new("RGB", size, (20, 60, 200))
    rw, rh = max(28, w // 4), max(28, h // 4)  # >= 28 px, so crop() does not enlarge it
    x0, y0 = min(int(w * 0.3), w - rw), min(int(h * 0.4), h - rh)
    ImageDraw.Draw(img).rectangle((x0, y0, x0 + rw - 1, y0 + rh - 1), fill=(255, 0, 0))  # inclusive
    sw, sh = seen_size(img, max_pixels=max_pixels)
    box = [round(x0 * sw / w), round(y0 * sh / h),
           round((x0 + rw) * sw / w), round((y0 + rh) * sh / h)]  # integers, as the model says them
    out, msg = crop(img, box, (sw, sh))
    assert out is not None and msg.startswith("Cropped region") and f"{w}x{h}" in msg
    tol = 2 * max(w / sw, h / sh, 1.0)  # one rounded seen pixel is w / sw original pixels
    assert abs(out.width - rw) <= tol and abs(out.height - rh) <= tol
    inner = np.asarray(out)[3:-3, 3:-3].reshape(-1, 3)
    assert (inner == [255, 0, 0]).all(axis=1).mean() > 0.95


def test_crop_clamps_to_image():
    img = Image.new("RGB", (200, 100))
    out, msg = crop(img, [-50, -20, 120, 60])
    assert out.size == (120, 60) and "[0, 0, 120, 60]" in msg
    out, _ = crop(img, [150, 50, 900, 900])
    assert out.size == (50, 50)


@pytest.mark.parametrize("bbox", [
    [float("nan"), 0, 10, 10], [0, 0, float("inf"), 10], [0, 0, 10, -float("inf")],
    [50, 50, 10, 10], [10, 10, 10, 50], [10, 10, 50, 10], [1, 2, 3], [1, 2, 3, 4, 5], [],
    ["1", "2", "30", "40"], "1,2,30,40", None, {"x1": 1}, [True, 0, 30, 30], [[1], 2, 3, 4],
    [300, 300, 400, 400], [-90, -90, -10, -10], [10 ** 400, 0, 10 ** 401, 5]])
def test_crop_bad_boxes_give_error_observation(bbox):
    out, msg = crop(Image.new("RGB", (200, 100)), bbox)
    assert out is None and msg.startswith("Error: ")


def test_crop_no_image_and_elongated():
    assert crop(None, [0, 0, 5, 5])[0] is None
    out, msg = crop(Image.new("RGB", (10_000, 30)), [0, 0, 10_000, 30])
    assert out is None and "aspect ratio" in msg


def test_crop_enlarges_tiny_boxes():
    img = Image.new("RGB", (200, 100))
    out, msg = crop(img, [100, 50, 105, 52])
    assert out.size == (28, 28) and "[88, 37, 116, 65]" in msg  # centred on (102, 51)
    out, msg = crop(img, [0, 0, 3, 3])  # at the corner: shifted to stay inside the image
    assert out.size == (28, 28) and "[0, 0, 28, 28]" in msg
    out, _ = crop(Image.new("RGB", (20, 10)), [0, 0, 5, 5])  # image smaller than 28 px: upscaled
    assert min(out.size) >= 28 and out.size == (56, 28)


def test_crop_fuzz_never_raises():
    rng = random.Random(0)
    img = Image.new("RGB", (64, 48))
    values = [0, 1, -1, 27.5, 1e9, -1e9, 1e308, float("nan"), float("inf"), "7", None, [], 10 ** 50]
    for _ in range(300):
        bbox = [rng.choice(values + [rng.uniform(-100, 200)])
                for _ in range(rng.choice([3, 4, 4, 5]))]
        out, msg = crop(img, bbox, seen_size=rng.choice([None, (56, 56), (84, 56)]))
        assert (out is None) == msg.startswith("Error: ")


# ----------------------------------------------------------------------------------------------
# TextSearch (BM25)
# ----------------------------------------------------------------------------------------------


def test_bm25_hand_computed():
    docs = ["the cat sat", "the dog sat on the mat", "cat cat dog"]
    ts = TextSearch(docs)  # k1 = 1.5, b = 0.75
    # N = 3, |d| = 3, 6, 3, avgdl = 12 / 3 = 4
    # n(cat) = 2, n(dog) = 2 -> IDF = ln((3 - 2 + 0.5) / (2 + 0.5) + 1) = ln(1.6)
    idf = math.log(1.6)
    norm3 = 1.5 * (1 - 0.75 + 0.75 * 3 / 4)  # = 1.21875 for a 3-token document
    norm6 = 1.5 * (1 - 0.75 + 0.75 * 6 / 4)  # = 2.0625 for the 6-token document
    d0 = idf * 1 * 2.5 / (1 + norm3)  # cat once
    d1 = idf * 1 * 2.5 / (1 + norm6)  # dog once
    d2 = idf * 2 * 2.5 / (2 + norm3) + idf * 1 * 2.5 / (1 + norm3)  # cat twice + dog once
    hits = ts.search("Cat dog", k=3)
    assert [h["id"] for h in hits] == ["2", "0", "1"]
    assert [h["score"] for h in hits] == pytest.approx([d2, d0, d1])
    assert hits[0]["text"] == "cat cat dog"
    # n(mat) = 1 -> IDF = ln((3 - 1 + 0.5) / (1 + 0.5) + 1) = ln(8 / 3)
    assert ts.search("mat", k=3)[0]["score"] == pytest.approx(math.log(8 / 3) * 2.5 / (1 + norm6))
    # query terms count once: "cat cat" scores like "cat"
    assert ts.search("cat cat", k=1)[0]["score"] == pytest.approx(idf * 2 * 2.5 / (2 + norm3))
    assert ts.search("zebra") == []


def test_bm25_chinese_and_observe():
    docs = [{"id": "art52", "title": "合同法第五十二条", "text": "有下列情形之一的，合同无效：一方以欺诈、胁迫的手段订立合同"},
            {"id": "art3", "text": "合同当事人的法律地位平等，一方不得将自己的意志强加给另一方。"},
            {"id": "en", "text": "A contract is void if obtained by fraud."}]
    assert tokenize("合同无效 Void!") == ["合", "同", "无", "效", "void"]
    ts = TextSearch(docs)
    assert ts.search("合同无效的情形", k=1)[0]["id"] == "art52"
    assert ts.search("FRAUD")[0]["id"] == "en"
    obs = ts.observe("合同无效", k=2)
    assert obs.startswith("Doc 1(Title: 合同法第五十二条) 有下列情形") and "Doc 2(Title: art3)" in obs
    assert ts.observe("   ").startswith("Error: ") and ts.observe("x" * 513).startswith("Error: ")
    assert ts.observe("zebra") == "No results found."
    with pytest.raises(SearchError):
        ts.search("")


def test_text_search_config_errors(tmp_path, monkeypatch):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "a", "text": "alpha"}\n{"id": "b", "text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2"):
        TextSearch.from_jsonl(path)
    path.write_text('{"id": "a", "contents": "alpha beta"}\n\n{"text": "gamma"}\n',
                    encoding="utf-8")
    assert [h["id"] for h in TextSearch.from_jsonl(path).search("gamma alpha")] == ["1", "a"]
    with pytest.raises(FileNotFoundError):
        TextSearch.from_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError):
        TextSearch()  # no backend at all
    with pytest.raises(ValueError):
        TextSearch([])
    with pytest.raises(ValueError):
        TextSearch([{"id": 1}])
    with pytest.raises(ValueError):
        TextSearch(endpoint="ftp://example.org")
    monkeypatch.setenv("TEXT_SEARCH_ENDPOINT", "http://127.0.0.1:9/retrieve")
    assert TextSearch(["x"]).http is None  # env ignored unless use_env=True
    assert TextSearch(use_env=True).http.endpoint == "http://127.0.0.1:9/retrieve"


# ----------------------------------------------------------------------------------------------
# HTTP backends against a local stub server
# ----------------------------------------------------------------------------------------------


class _Stub(BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Stub.requests.append({"path": self.path, "body": json.loads(body),
                               "auth": self.headers.get("Authorization")})
        if self.path == "/slow":
            time.sleep(1.0)
        if self.path == "/drip":  # valid headers, then one byte every 0.2 s for 4 s
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                for ch in (' ' * 19 + '{"results": []}'):
                    self.wfile.write(ch.encode())
                    self.wfile.flush()
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/retrieve")
            self.end_headers()
            return
        payload = {
            "/retrieve": json.dumps({"results": [{"id": "w1", "text": "Paris is the capital.",
                                                  "score": 9.5},
                                                 {"id": "w2", "text": "France.", "score": 1}]}),
            "/images": json.dumps({"results": [{"name": "Eiffel Tower", "caption": "Paris landmark",
                                                "score": 0.9}]}),
            "/big": json.dumps({"results": [{"id": "x", "text": "a" * 50_000}]}),
            "/notjson": "<html>oops</html>",
            "/badshape": json.dumps({"hits": []}),
        }.get(self.path, "")
        status = 500 if self.path == "/error" else 200
        data = payload.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if self.path != "/big":  # the oversize reply comes without a length, so it must be streamed
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first, as it should
            pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_text_search(server):
    _Stub.requests.clear()
    ts = TextSearch(endpoint=server + "/retrieve", api_key="secret", timeout=2)
    hits = ts.search("capital of France?", k=1)
    assert hits == [{"id": "w1", "text": "Paris is the capital.", "score": 9.5}]
    req = _Stub.requests[-1]
    assert req == {"path": "/retrieve", "body": {"query": "capital of France?", "k": 1},
                   "auth": "Bearer secret"}
    assert ts.observe("x",
                      k=2) == "Doc 1(Title: w1) Paris is the capital.\nDoc 2(Title: w2) France."


@pytest.mark.parametrize("path, needle", [
    ("/slow", "timed out"), ("/big", "larger than"), ("/notjson", "not return JSON"),
    ("/badshape", "results"), ("/error", "HTTP 500"), ("/redirect", "HTTP 302")])
def test_http_failures_become_observations(server, path, needle):
    ts = TextSearch(endpoint=server + path, timeout=0.3, max_response_bytes=10_000)
    start = time.monotonic()
    obs = ts.observe("query")
    assert obs.startswith("Error: ") and needle in obs
    assert time.monotonic() - start < 0.9
    with pytest.raises(SearchError):
        ts.search("query")


def test_http_timeout_bounds_the_whole_exchange(server):
    """A server that drips a byte every 0.2 s never trips a per-read timeout; the call must
    still end at its 1 s deadline (it took the drip's full length before)."""
    ts = TextSearch(endpoint=server + "/drip", timeout=1.0)
    start = time.monotonic()
    obs = ts.observe("query")
    took = time.monotonic() - start
    assert obs.startswith("Error: ") and "timed out after 1.0 s" in obs
    assert took < 1.6, took


def test_http_redirect_not_followed(server):
    _Stub.requests.clear()
    TextSearch(endpoint=server + "/redirect").observe("q")
    assert [r["path"] for r in _Stub.requests] == ["/redirect"]


def test_http_image_search(server):
    _Stub.requests.clear()
    img = Image.new("RGB", (30, 20), (1, 2, 3))
    search = ImageSearch(endpoint=server + "/images")
    assert search.search(img) == [{"name": "Eiffel Tower", "caption": "Paris landmark",
                                   "score": 0.9}]
    body = _Stub.requests[-1]["body"]
    assert body["k"] == 1 and _Stub.requests[-1]["path"] == "/images"
    sent = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert sent.format == "PNG" and sent.size == (30, 20)
    assert search.observe(img) == "Image 1(Title: Eiffel Tower) Paris landmark"
    assert ImageSearch(endpoint=server + "/notjson").observe(img).startswith("Error: ")


# ----------------------------------------------------------------------------------------------
# ImageSearch (local)
# ----------------------------------------------------------------------------------------------


def _kb_images() -> list[tuple[Image.Image, str, str]]:
    specs = [("red disc", (255, 255, 255), "ellipse", (220, 30, 30)),
             ("blue square", (255, 255, 255), "rectangle", (30, 30, 220)),
             ("red square on black", (0, 0, 0), "rectangle", (220, 30, 30)),
             ("green disc on grey", (128, 128, 128), "ellipse", (30, 200, 30)),
             ("yellow bar", (255, 255, 255), "bar", (240, 220, 20))]
    out = []
    for name, bg, shape, colour in specs:
        img = Image.new("RGB", (96, 64), bg)
        d = ImageDraw.Draw(img)
        if shape == "ellipse":
            d.ellipse((20, 10, 70, 55), fill=colour)
        elif shape == "rectangle":
            d.rectangle((30, 15, 65, 50), fill=colour)
        else:
            d.rectangle((0, 25, 95, 38), fill=colour)
        out.append((img, name, f"a {name}"))
    return out


def test_image_search_finds_noised_copy():
    kb = _kb_images()
    search = ImageSearch(kb)
    rng = np.random.default_rng(0)
    for img, name, caption in kb:
        noisy = np.clip(np.asarray(img, dtype=np.float64) + rng.normal(0, 12, (64, 96, 3)), 0, 255)
        query = Image.fromarray(noisy.astype(np.uint8)).resize((120, 80))
        hits = search.search(query, k=2)
        assert hits[0]["name"] == name and hits[0]["caption"] == caption
        assert hits[0]["score"] > hits[1]["score"] and hits[0]["score"] > 0.9
    assert search.observe(kb[1][0]) == "Image 1(Title: blue square) a blue square"
    assert search.observe(None).startswith("Error: ")
    assert search.observe(Image.new("RGB", (0, 0))).startswith("Error: ")
    with pytest.raises(ValueError):
        ImageSearch([])


# Qwen/Qwen2.5-VL-3B-Instruct's published preprocessor_config.json (the 7B one is the same)
QWEN25VL_3B_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor"}


def test_seen_size_and_crop_follow_the_loaded_processor():
    """With the published 3B processor a 1600x1200 image is seen as 1596x1204 (the library
    defaults would say 1148x840, putting crops ~39 % off); seen_size agrees with the processor's
    own image_grid_thw for several sizes, and a box in seen pixels maps back to the original."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from common import tools as tools_mod
    from common.models import image_processor_for
    # (image_processor_for(folder) reads the same file; its first from_pretrained costs ~10 s here)
    ip = Qwen2VLImageProcessorPil(**{k: v for k, v in QWEN25VL_3B_PREPROCESSOR.items()
                                     if k not in ("image_processor_type", "processor_class")})
    img = Image.new("RGB", (1600, 1200))
    assert tools_mod.seen_size(img, ip) == (1596, 1204)
    assert tools_mod.seen_size(img, image_processor_for()) == (1148, 840)
    for w, h in [(1600, 1200), (30, 500), (640, 480), (333, 1000)]:
        grid = ip(images=[Image.new("RGB", (w, h))],
                  return_tensors="pt")["image_grid_thw"][0].tolist()
        assert tools_mod.seen_size(Image.new("RGB", (w, h)), ip) == (grid[2] * 14, grid[1] * 14)
    saved = tools_mod._PROCESSOR
    try:
        tools_mod.set_image_processor(ip)        # what load_policy does for a VLM
        assert tools_mod.seen_size(img) == (1596, 1204)
        out, _ = tools_mod.crop(img, [798, 602, 1596, 1204], seen_size=tools_mod.seen_size(img))
        # the bottom-right quarter
        assert abs(out.width - 800) <= 2 and abs(out.height - 600) <= 2
    finally:
        tools_mod.set_image_processor(saved)


def test_max_pixels_caps_what_is_seen_and_crops_map_back(tmp_path):
    """The published 3B processor loaded with the training cap (image_processor_for(folder,
    max_pixels=1280*28*28), as load_policy does): a 2000x1500 image is seen at <= max_pixels,
    as the processor encodes it, and a box in that frame crops the same part of the original."""
    from common import tools as tools_mod
    from common.models import DEFAULT_MAX_PIXELS, image_processor_for
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN25VL_3B_PREPROCESSOR))
    ip = image_processor_for(str(tmp_path), max_pixels=DEFAULT_MAX_PIXELS)
    img = Image.new("RGB", (2000, 1500), (20, 60, 200))
    ImageDraw.Draw(img).rectangle((400, 300, 799, 599), fill=(255, 0, 0))   # inclusive
    w, h = tools_mod.seen_size(img, ip)
    assert w * h <= DEFAULT_MAX_PIXELS and (w, h) == (1148, 840)
    assert tools_mod.seen_size(img, image_processor_for(str(tmp_path))) == (1988, 1512)  # 12.8 MP
    grid = ip(images=[img], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert (w, h) == (grid[2] * 14, grid[1] * 14)
    box = [400 * w / 2000, 300 * h / 1500, 800 * w / 2000, 600 * h / 1500]
    out, msg = crop(img, [round(v) for v in box], (w, h))
    assert abs(out.width - 400) <= 4 and abs(out.height - 300) <= 4, msg
    inner = np.asarray(out)[4:-4, 4:-4].reshape(-1, 3)
    assert (inner == [255, 0, 0]).all(axis=1).mean() > 0.99
