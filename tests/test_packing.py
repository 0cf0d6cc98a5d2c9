"""Packing invariants on real stdlib text: exact rows, EOS separators, boundaries, lossless decode."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.instruct import encode_examples
from data_prep.packing import pack_documents, pack_examples
from data_prep.tokenizer import load_tokenizer


def unpack_documents(input_ids: np.ndarray, doc_lens: list[list[int]], eos_id: int) -> list[list[int]]:
    """Rebuild whole documents from rows by following segments; a document ends at a segment ending in EOS."""
    docs, current = [], []
    for row, lens in zip(input_ids, doc_lens):
        start = 0
        for n in lens:
            current.extend(row[start : start + n].tolist())
            start += n
            if current[-1] == eos_id:  # every document ends in EOS; text never encodes to it
                docs.append(current[:-1])
                current = []
    return docs


@pytest.mark.parametrize("seq_len", [64, 257, 1024])
def test_every_row_is_seq_len_and_documents_decode_back(sample, seq_len):
    tok = load_tokenizer(sample.tokenizer)
    texts = sample.texts("domain")[:25] + sample.texts("general")[:25]
    ids = tok.encode_batch(texts)
    packed = pack_documents(ids, seq_len, tok.eos_id)

    assert packed.input_ids.shape[1] == seq_len and packed.input_ids.dtype == np.int32
    assert all(sum(lens) == seq_len for lens in packed.doc_lens)
    total = sum(len(i) + 1 for i in ids)
    assert packed.num_rows * seq_len + packed.dropped_tokens == total
    assert packed.dropped_tokens < seq_len
    rebuilt = unpack_documents(packed.input_ids, packed.doc_lens, tok.eos_id)
    whole = len(rebuilt)
    doc_ends = np.cumsum([len(i) + 1 for i in ids])
    used = packed.num_rows * seq_len
    assert doc_ends[whole - 1] <= used < doc_ends[whole]  # exactly the documents ending in kept rows come back
    assert rebuilt == ids[:whole]
    assert [tok.decode(r) for r in rebuilt] == texts[:whole]


def test_segments_mark_document_boundaries_exactly(sample):
    tok = load_tokenizer(sample.tokenizer)
    ids = tok.encode_batch(sample.texts("general")[:10])
    packed = pack_documents(ids, 128, tok.eos_id)
    flat = packed.input_ids.reshape(-1)
    doc_ends = np.cumsum([len(i) + 1 for i in ids])
    seg_ends = np.cumsum([n for lens in packed.doc_lens for n in lens])
    row_edges = np.arange(1, packed.num_rows + 1) * 128
    expected = np.union1d(doc_ends[doc_ends <= len(flat)], row_edges)
    np.testing.assert_array_equal(seg_ends, expected)
    assert np.all(flat[doc_ends[doc_ends <= len(flat)] - 1] == tok.eos_id)


def test_instruction_examples_are_whole_and_prompt_tokens_carry_no_loss(sample):
    import json

    tok = load_tokenizer(sample.tokenizer)
    records = [json.loads(line) for line in sample.instruction.read_text().splitlines()]
    examples = [
        tuple((m["role"], m["content"]) for m in r["messages"])
        if "messages" in r
        else (("user", r["prompt"]), ("assistant", r["response"]))
        for r in records
    ]
    encoded = encode_examples(tok, examples)
    packed = pack_examples(encoded, 192, tok.eos_id)

    placed = [k for k in range(len(encoded)) if k not in packed.too_long]
    assert all(len(encoded[k][0]) > 192 for k in packed.too_long)
    segments = []
    for row, mask, lens in zip(packed.input_ids, packed.loss_mask, packed.doc_lens):
        assert sum(lens) == 192
        start = 0
        for n in lens:
            segments.append((row[start : start + n].tolist(), mask[start : start + n].tolist()))
            start += n
    real = [s for s in segments if any(s[1])]
    padding = [s for s in segments if not any(s[1])]
    assert [s[0] for s in real] == [encoded[k][0] for k in placed]  # every example whole, in order
    assert all(set(ids) == {tok.eos_id} for ids, _ in padding)
    for (ids, mask), k in zip(real, placed):
        answer = examples[k][-1][1]
        loss_text = tok.decode([t for t, m in zip(ids, mask) if m and t != tok.eos_id])
        prompt_text = tok.decode([t for t, m in zip(ids, mask) if not m])
        assert loss_text == answer
        assert examples[k][0][1] in prompt_text and answer not in prompt_text
        assert ids[-1] == tok.eos_id and mask[-1] == 1


def test_over_long_example_is_reported_not_cut():
    packed = pack_examples([([1] * 10, [1] * 10), ([2] * 3, [1] * 3)], 8, 0)
    assert packed.too_long == [0]
    assert packed.input_ids.tolist() == [[2, 2, 2, 0, 0, 0, 0, 0]]
    assert packed.doc_lens == [[3, 5]] and packed.padding_tokens == 5


def test_the_sample_tokenizer_trains_byte_identically_every_time(sample, tmp_path):
    from data_prep.sample import train_sample_tokenizer

    again = train_sample_tokenizer([sample.domain, sample.general], tmp_path / "again.model", 768)
    assert again.read_bytes() == sample.tokenizer.read_bytes()
