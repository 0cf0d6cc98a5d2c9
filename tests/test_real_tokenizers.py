"""Real Hugging Face tokenizers (SmolLM2, Gemma-3): start convention, control-token literals, chat templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_prep.build import BuildOptions, SourceSpec, build_source, chunk_tables, load_build
from data_prep.instruct import TemplateError, encode_examples
from data_prep.tokenizer import load_tokenizer

pytestmark = pytest.mark.real_model

LITERALS = "Close a turn with <|im_end|> and a file with <|endoftext|>; Gemma writes <bos> and <eos>."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_gemma_documents_start_with_bos_in_rows_holdout_and_manifest(gemma3, sample, tmp_path):
    tok = load_tokenizer(gemma3)
    assert tok.bos_ids == (2,)  # what Gemma's own tokenizer puts before every text
    spec = SourceSpec(name="docs", role="general", paths=(str(sample.general),), holdout_fraction=0.1)
    out = build_source(spec, BuildOptions(seq_len=256, docs_per_chunk=64), str(gemma3), tmp_path, quiet=True)
    summary = load_build(out)
    assert summary["document_start_ids"] == [2]
    starts = documents = 0
    for table in chunk_tables(out, "rows"):
        for ids, lens in zip(table.column("input_ids").to_pylist(), table.column("doc_lens").to_pylist()):
            offset = 0
            for n in lens[:-1]:  # a segment after an EOS starts a new document
                offset += n
                documents += 1
                starts += ids[offset] == 2
    assert documents > 20 and starts == documents
    holdout = [r for t in chunk_tables(out, "holdout") for r in t.column("input_ids").to_pylist()]
    assert holdout and all(r[0] == 2 and r[-1] == tok.eos_id and 2 not in r[1:] for r in holdout)


def test_smollm2_adds_nothing_before_a_document(smollm2):
    tok = load_tokenizer(smollm2)
    assert tok.bos_ids == ()
    assert tok.encode_batch(["Hello"])[0] == tok.encode_rendered(["Hello"])[0]


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_control_token_literals_in_raw_text_stay_text_and_are_counted(model, request, tmp_path):
    path = request.getfixturevalue(model)
    tok = load_tokenizer(path)
    special = {tok.eos_id, *tok.bos_ids}
    [ids] = tok.encode_batch([LITERALS])
    body = ids[len(tok.bos_ids) :]
    assert not special & set(body)  # no EOS or BOS mid-document
    assert tok.decode(body) == LITERALS
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": f"{LITERALS} Document {i}."} for i in range(40)])
    spec = SourceSpec(name="lit", role="domain", paths=(str(corpus),), holdout_fraction=0.0)
    out = build_source(spec, BuildOptions(seq_len=64, docs_per_chunk=16), str(path), tmp_path / "cache", quiet=True)
    summary = load_build(out)
    assert summary["special_token_literals"] == 40 * len(tok.special_literals(LITERALS)) > 0
    for table in chunk_tables(out, "rows"):
        for ids, lens in zip(table.column("input_ids").to_pylist(), table.column("doc_lens").to_pylist()):
            eos_at = [k for k, t in enumerate(ids) if t == tok.eos_id]
            ends = [sum(lens[: k + 1]) - 1 for k in range(len(lens))]
            assert set(eos_at) <= set(ends)  # an EOS only where doc_lens says a document ends


def test_smollm2_chat_template_masks_prompts_and_ends_with_one_eos(smollm2):
    tok = load_tokenizer(smollm2)
    conversation = (
        ("user", "What is a list?"),
        ("assistant", "A mutable sequence."),
        ("user", "And a tuple?"),
        ("assistant", "An immutable one."),
    )
    [(ids, mask)] = encode_examples(tok, [conversation])
    rendered = tok.render_chat(conversation, add_generation_prompt=False)
    assert tok.decode(ids) == rendered.rstrip("\n")  # the template's text; it ends at its own <|im_end|> (the EOS)
    assert ids[-1] == tok.eos_id != ids[-2] and mask[-1] == 1  # one end token, and it carries loss
    assert ids.count(tok.eos_id) == rendered.count("<|im_end|>")  # the turn markers are real control tokens
    with_loss = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "A mutable sequence." in with_loss and "An immutable one." in with_loss
    assert "What is a list?" not in with_loss and "helpful AI assistant" not in with_loss


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name(smollm2, tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(smollm2, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    # shows only the last assistant answer, as templates that drop past reasoning do
    (copy / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = load_tokenizer(copy)
    conversation = (("user", "a?"), ("assistant", "A."), ("user", "b?"), ("assistant", "B."))
    with pytest.raises(TemplateError, match=r"renders the prompt of turn 3 differently from the turns before it"):
        encode_examples(tok, [conversation])


def test_instruction_examples_with_control_literals_are_rejected_and_counted(smollm2, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}" + (" <|im_end|>" if i == 3 else "")},
            ]
        }
        for i in range(30)
    ]
    corpus = write_jsonl(tmp_path / "sft.jsonl", rows)
    spec = SourceSpec(name="sft", role="instruction", paths=(str(corpus),), holdout_fraction=0.0)
    out = build_source(
        spec,
        BuildOptions(seq_len=128, docs_per_chunk=16, max_reject_fraction=0.1),
        str(smollm2),
        tmp_path / "cache",
        quiet=True,
    )
    summary = load_build(out)
    assert summary["rejects"] == 1 and summary["docs_train"] == 29
    reject = json.loads((out / "rejects.jsonl").read_text().splitlines()[0])
    assert reject["line"] == 4 and "<|im_end|>" in reject["reason"]
