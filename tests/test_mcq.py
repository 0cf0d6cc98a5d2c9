"""Multiple-choice accuracy: each choice's score is the model's own log-likelihood of it after the prompt."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_core.errors import InputError
from data_prep.tokenizer import load_tokenizer
from pipeline.evaluation.mcq import Question, choice_logprobs, mcq_accuracy, prompt, read_questions

EASY = [  # (question, right answer, wrong answers): what a small pretrained model knows
    ("What is the capital of France?", "Paris", ["Banana", "Seven", "Blue"]),
    ("What color is the sky on a clear day?", "Blue", ["Purple with yellow stripes", "Square", "Loud"]),
    ("How many days are in a week?", "Seven", ["Forty-two", "Green", "Paris"]),
    ("What do bees make?", "Honey", ["Steel beams", "Television sets", "Concrete"]),
    ("What is the opposite of hot?", "Cold", ["Table", "Quickly", "Seventeen"]),
    ("Which animal barks?", "A dog", ["A fish", "A spoon", "A cloud"]),
]


def write_csv(path, rows, shift: int = 0) -> None:
    """MMLU's layout; ``shift`` moves every answer letter to a wrong choice."""
    lines = []
    for question, right, wrong in rows:
        choices = [right, *wrong]
        lines.append(",".join([f'"{question}"', *(f'"{c}"' for c in choices), "ABCD"[shift % len(choices)]]))
    path.write_text("\n".join(lines) + "\n")


def test_choice_scores_equal_the_models_own_loss_on_the_continuation(sample):
    tokenizer = load_tokenizer(sample.tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    ).eval()
    questions = [Question(q, (right, *wrong), 0) for q, right, wrong in EASY[:3]]
    scores = choice_logprobs(lambda ids: model(input_ids=ids).logits, tokenizer, questions)
    for question, got in zip(questions, scores):
        n = len(tokenizer.encode_batch([prompt(question)])[0])
        for choice, value in zip(question.choices, got):
            whole = tokenizer.encode_batch([prompt(question) + " " + choice])[0]  # as a reader of the text sees it
            continuation = whole[n:]
            ids = torch.tensor([whole])
            labels = torch.tensor([[-100] * n + continuation])
            with torch.no_grad():
                mean_nll = model(input_ids=ids, labels=labels).loss  # HF's own shift and mean over the choice
            assert value == pytest.approx(-float(mean_nll) * len(continuation), rel=1e-5, abs=1e-5)
    expected = sum(max(range(len(s)), key=s.__getitem__) == 0 for s in scores) / len(questions)
    assert mcq_accuracy(lambda ids: model(input_ids=ids).logits, tokenizer, questions)["acc"] == expected


@pytest.mark.real_model
def test_a_real_model_answers_easy_questions_and_misses_when_the_key_is_wrong(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2), local_files_only=True).eval()
    tokenizer = load_tokenizer(smollm2)
    right, wrong = tmp_path / "right.csv", tmp_path / "wrong.csv"
    write_csv(right, EASY)
    write_csv(wrong, EASY, shift=1)
    forward = lambda ids: model(input_ids=ids).logits  # noqa: E731
    assert mcq_accuracy(forward, tokenizer, read_questions(right))["acc"] >= 5 / 6
    assert mcq_accuracy(forward, tokenizer, read_questions(wrong))["acc"] <= 1 / 6


def test_jsonl_and_csv_give_the_same_questions(tmp_path):
    write_csv(tmp_path / "q.csv", EASY)
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"question": q, "choices": [r, *w], "answer": 0}) + "\n" for q, r, w in EASY)
    )
    assert read_questions(tmp_path / "q.csv") == read_questions(tmp_path / "q.jsonl")


def test_a_quoted_field_keeps_its_line_breaks_and_later_rows_their_line_numbers(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('"What does\nthis print?","1","2","A"\n"Q?","a","b","Z"\n')
    with pytest.raises(InputError, match="answer 'Z'") as e:
        read_questions(path)
    assert str(e.value).startswith(f"{path}:3: ")
    path.write_text('"What does\nthis print?","1","2","A"\n')
    assert read_questions(path)[0].question == "What does\nthis print?"


@pytest.mark.reliability("bad input")
@pytest.mark.parametrize(
    "line, message",
    [
        ('"Q?","a","b","E"', "answer 'E' is not one of ['A', 'B']"),
        ('"Q?","a","b","AB"', "answer 'AB' is not one of ['A', 'B']"),
        ('"Q?","a"', "got 2 fields"),
        ('"Q?","a","","A"', "at least 2 non-empty choices"),
    ],
)
def test_a_malformed_question_names_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "q.csv"
    path.write_text('"Fine?","yes","no","A"\n' + line + "\n")
    with pytest.raises(InputError, match=re.escape(message)) as e:
        read_questions(path)
    assert str(e.value).startswith(f"{path}:2: ")
