"""Tokenizer loading: a local Hugging Face directory with a chat template, and clear errors."""

from __future__ import annotations

import pytest

from cpt_core.errors import UserError
from data_prep.instruct import encode_examples
from data_prep.tokenizer import HFTokenizer, load_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def hf_dir(sample, tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(sample.texts("general"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(str(out))
    return out


def test_hf_directory_loads_with_a_stable_fingerprint_and_roundtrips(hf_dir, sample):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 1
    assert load_tokenizer(hf_dir).fingerprint == tok.fingerprint != load_tokenizer(sample.tokenizer).fingerprint
    text = sample.texts("general")[0]
    assert tok.decode(tok.encode_batch([text])[0]) == text


def test_chat_template_masks_everything_but_assistant_turns(hf_dir):
    tok = load_tokenizer(hf_dir)
    conversation = (
        ("system", "Be brief."),
        ("user", "What is a list?"),
        ("assistant", "A mutable sequence."),
        ("user", "And a tuple?"),
        ("assistant", "An immutable one."),
    )
    [(ids, mask)] = encode_examples(tok, [conversation])
    rendered = tok.render_chat(conversation, add_generation_prompt=False)
    # the template's own text, piece by piece; its last end-of-turn is the EOS, so none is appended
    assert tok.decode(ids) == rendered and ids[-1] == tok.eos_id != ids[-2]
    with_loss = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "A mutable sequence." in with_loss and "An immutable one." in with_loss
    assert "What is a list?" not in with_loss and "Be brief." not in with_loss


def test_directory_without_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="holds no tokenizer files"):
        load_tokenizer(tmp_path)
