"""Readers: every supported format yields the same documents; bad records become named rejects."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cpt_core.errors import InputError, UserError
from data_prep.documents import Document, Reject
from data_prep.readers import ReadOptions, read_documents, resolve_inputs

TEXTS = ["first document", "second one\nwith two lines", "ünïcödé ✓ third"]


def docs(paths, **kw):
    return list(read_documents(resolve_inputs([str(p) for p in paths]), ReadOptions(**kw)))


def texts(items):
    return [d.text for d in items if isinstance(d, Document)]


def test_all_formats_yield_the_same_documents_in_order(tmp_path):
    lines = "".join(json.dumps({"text": t, "meta": 1}) + "\n" for t in TEXTS).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    table = pa.table({"text": TEXTS})
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "e.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    import datasets

    datasets.Dataset(table).save_to_disk(str(tmp_path / "f_saved"))
    for i, t in enumerate(TEXTS):
        (tmp_path / "txt").mkdir(exist_ok=True)
        (tmp_path / "txt" / f"{i}.txt").write_text(t)
    (tmp_path / "docs").mkdir()  # reStructuredText, gzipped as Debian ships documentation (linux-doc)
    for i, suffix in enumerate((".rst.gz", ".rst", ".md.gz")):
        (tmp_path / "docs" / f"{i}{suffix}").write_bytes(
            gzip.compress(TEXTS[i].encode()) if suffix.endswith("gz") else TEXTS[i].encode()
        )
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e.arrow", "f_saved", "txt", "docs"):
        assert texts(docs([tmp_path / name])) == TEXTS, name
    assert len(resolve_inputs([str(tmp_path / "*.jsonl*")])) == 3


def test_bad_records_become_rejects_naming_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "good one"}\n'
        b'{"text": "truncated\n'
        b'{"text": "bad \xff\xfe utf8"}\n'
        b'{"text": ""}\n'
        b'{"body": "wrong field"}\n'
        b'{"text": 42}\n'
        b"[1, 2]\n"
        b'{"text": "nul \\u0000 inside"}\n'
        b'{"text": "good two"}\n'
    )
    items = docs([path])
    assert texts(items) == ["good one", "good two"]
    rejects = {r.line: r.reason for r in items if isinstance(r, Reject)}
    assert set(rejects) == {2, 3, 4, 5, 6, 7, 8}
    assert rejects[2].startswith("malformed JSON")
    assert rejects[3].startswith("invalid UTF-8")
    assert "is empty" in rejects[4]
    assert "missing field 'text'" in rejects[5] and "body" in rejects[5]
    assert "not a string" in rejects[6]
    assert "JSON object" in rejects[7]
    assert "NUL" in rejects[8]
    assert all(r.path == str(path) for r in items if isinstance(r, Reject))


def test_binary_file_and_huge_document_are_rejected_not_loaded(tmp_path):
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary" * 100)
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"text": "x" * (50 << 20)}) + "\n" + json.dumps({"text": "fine"}) + "\n")
    blob = docs([tmp_path / "blob.txt"])
    assert len(blob) == 1 and isinstance(blob[0], Reject) and "binary" in blob[0].reason
    items = docs([huge])
    assert isinstance(items[0], Reject) and items[0].line == 1 and "too long" in items[0].reason
    assert texts(items) == ["fine"]


def test_truncated_gzip_is_a_reject_after_the_good_lines(tmp_path):
    data = gzip.compress("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    items = docs([tmp_path / "cut.jsonl.gz"])
    assert isinstance(items[-1], Reject) and "truncated" in items[-1].reason
    assert texts(items) == [f"doc {i}" for i in range(len(texts(items)))] and len(texts(items)) > 10


def test_instruction_records_accept_prompt_response_and_messages(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "Q?", "response": "A."},
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"},
                    ]
                },
                {"messages": [{"role": "user", "content": "no answer"}]},
                {"question": "wrong fields"},
                {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},  # Alpaca
                {"instruction": "Say hi.", "input": "", "output": "Hi"},
                {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},  # ShareGPT
                {"conversations": [{"from": "robot", "value": "?"}]},
            ]
        )
        + "\n"
    )
    items = docs([path], instruction=True)
    assert items[0].messages == (("user", "Q?"), ("assistant", "A."))
    assert items[1].messages[-1] == ("assistant", "Hello")
    assert "no assistant" in items[2].reason and "needs 'messages'" in items[3].reason
    assert items[4].messages == (("user", "Translate.\n\nBonjour"), ("assistant", "Hello"))  # input kept, as Alpaca
    assert items[5].messages == (("user", "Say hi."), ("assistant", "Hi"))
    assert items[6].messages == (("user", "Hi"), ("assistant", "Hello"))
    assert "unknown 'from' 'robot'" in items[7].reason
    alpaca_fields = tmp_path / "io.jsonl"  # prompt_field input: the prompt is the input, not joined to itself
    alpaca_fields.write_text(json.dumps({"input": "Q?", "output": "A."}) + "\n")
    (item,) = docs([alpaca_fields], instruction=True, prompt_field="input", response_field="output")
    assert item.messages == (("user", "Q?"), ("assistant", "A."))


def test_unknown_file_type_and_missing_path_are_errors_naming_the_path(tmp_path):
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    with pytest.raises(InputError, match="data.xlsx: unknown file type"):
        resolve_inputs([str(tmp_path / "data.xlsx")])
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        resolve_inputs([str(tmp_path / "nope.jsonl")])


def test_parquet_without_the_text_column_rejects_each_row_naming_the_fields(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "other.parquet")
    items = docs([tmp_path / "other.parquet"])
    assert all(isinstance(r, Reject) and "missing field 'text'" in r.reason and "content" in r.reason for r in items)
    assert [r.line for r in items] == [1, 2]
