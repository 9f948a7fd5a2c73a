# Run: pytest tests/test_data.py -q
"""The shared record reader: JSON / JSON lines (also in .json) / CSV / parquet,
encodings, images."""
import io
import json

import pytest
from PIL import Image

from common.errors import UserError
from common.data import open_image, read_records, require, resolve_inside


def test_json_array_jsonl_in_json_and_csv(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"q": "x"}, {"q": "y"}]))
    assert read_records(tmp_path / "a.json") == [(f"{tmp_path}/a.json:item 1", {"q": "x"}),
                                                 (f"{tmp_path}/a.json:item 2", {"q": "y"})]
    # LexEval: JSON lines in .json
    (tmp_path / "lexeval.json").write_text('{"q": "x"}\n\n{"q": "y"}\n')
    assert [w for w, _ in read_records(tmp_path / "lexeval.json")] == \
        [f"{tmp_path}/lexeval.json:1", f"{tmp_path}/lexeval.json:3"]
    (tmp_path / "one.json").write_text('{\n "q": "x"\n}\n')
    assert read_records(tmp_path / "one.json")[0][1] == {"q": "x"}
    (tmp_path / "b.csv").write_text("question,A,B\nwho?,x,\n")
    assert read_records(tmp_path / "b.csv") == [(f"{tmp_path}/b.csv:2",
                                                 {"question": "who?", "A": "x", "B": ""})]


def test_bad_rows_name_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"q": 1}\n{"q": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('{"q": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"list.jsonl:2: expected a JSON object"):
        read_records(tmp_path / "list.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="holds no records"):
        read_records(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="no data file at"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "wide.csv").write_text("a,b\n1,2,3\n")
    with pytest.raises(UserError, match=r"wide.csv:2: more cells"):
        read_records(tmp_path / "wide.csv")
    with pytest.raises(UserError, match=r"x.jsonl:4: the record lacks 'answer'"):
        require({"question": "q", "answer": ""}, "x.jsonl:4", "question", "answer")


def test_encodings(tmp_path, capsys):
    row = {"question": "被告人犯盗窃罪吗？", "answer": "正确答案：B。"}
    (tmp_path / "gbk.json").write_bytes(json.dumps([row], ensure_ascii=False).encode("gb18030"))
    assert read_records(tmp_path / "gbk.json")[0][1] == row
    assert "read it as GB18030" in capsys.readouterr().out
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf"
                                         + json.dumps(row, ensure_ascii=False).encode())
    assert read_records(tmp_path / "bom.jsonl")[0][1] == row
    (tmp_path / "latin1.jsonl").write_bytes('{"q": "café au lait"}\n'.encode("latin-1")
                                            + b"\xff\xfe\n")
    with pytest.raises(UserError, match=r"is not UTF-8 .* nor GB18030; convert it"):
        read_records(tmp_path / "latin1.jsonl")


def test_parquet_with_embedded_image(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(buf, format="PNG")
    table = pa.table({"prompt": ["what?"],
                      "images": [[{"bytes": buf.getvalue(), "path": "x.png"}]]})
    pq.write_table(table, tmp_path / "fvqa.parquet")
    (where, row), = read_records(tmp_path / "fvqa.parquet")
    assert where.endswith("fvqa.parquet:row 1") and row["prompt"] == "what?"
    im = open_image(row["images"][0], tmp_path, where)
    assert im.size == (8, 6) and im.getpixel((0, 0)) == (255, 0, 0)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="not a readable parquet file"):
        read_records(tmp_path / "broken.parquet")


def test_images_stay_inside_the_data_folder(tmp_path):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / "ok.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    assert open_image("ok.png", tmp_path / "data", "d.jsonl:1").size == (4, 4)
    with pytest.raises(UserError, match="leaves the data folder"):
        open_image("../secret.png", tmp_path / "data", "d.jsonl:2")
    with pytest.raises(UserError, match="leaves the data folder"):
        resolve_inside(tmp_path / "data", str(tmp_path / "secret.png"), "d.jsonl:3")
    with pytest.raises(UserError, match=r"d.jsonl:4: the file .* does not exist"):
        open_image("nope.png", tmp_path / "data", "d.jsonl:4")


def test_non_images_and_bombs_name_file_and_row(tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_text("this is text")
    with pytest.raises(UserError, match=r"notes.png \(d.jsonl:5\) is not a readable image"):
        open_image("notes.png", tmp_path, "d.jsonl:5")
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr("common.data.MAX_IMAGE_PIXELS", 300 * 300 - 1)
    with pytest.raises(UserError, match=r"big.png \(d.jsonl:6\) is 300x300 pixels, over"):
        open_image("big.png", tmp_path, "d.jsonl:6")
    with pytest.raises(UserError, match="is not a readable image"):
        open_image(b"\x89PNG broken", tmp_path, "d.parquet:row 2")
