"""entrl.tokenizer: the character tokenizer and the Hugging Face adapter (tiny local tokenizer, no hub)."""

import pytest

from entrl.tokenizer import CHAR_ALPHABET, CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_hf_tokenizer(path, *, chat_template=CHATML, pad=True):
    """A tiny WordLevel PreTrainedTokenizerFast with ChatML specials, saved to `path`."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<unk> <pad> <|endoftext|> <|im_start|> <|im_end|> user assistant system \n what is 1 2 3 + = ? hello world".split(" ")
    vocab = {w: i for i, w in enumerate(words)}
    raw = RawTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        pad_token="<pad>" if pad else None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(str(path))
    return path


def test_char_round_trip_and_specials():
    tok = load_tokenizer("char")
    assert isinstance(tok, CharTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.vocab_size == len(tok) < 64
    text = "3+4*2=4*2=8,3+8=11 \\boxed{11}"
    ids = tok.encode(text)
    assert len(ids) == len(text) and min(ids) >= 3
    assert tok.decode(ids) == text
    assert tok.decode([1] + ids + [2, 0]) == text
    assert tok.decode([1] + ids + [2], skip_special_tokens=False) == "<bos>" + text + "<eos>"
    assert tok.stop_token_ids == [2]
    # Every alphabet character round-trips, ids are stable.
    assert tok.decode(tok.encode(CHAR_ALPHABET)) == CHAR_ALPHABET
    assert tok.encode("0") == [3]


def test_char_unknown_character_named():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="'#'"):
        tok.encode("1+#")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([999])


def test_char_chat_template_is_short():
    tok = CharTokenizer()
    msgs = [{"role": "user", "content": "3+4*2"}]
    assert tok.apply_chat_template(msgs) == "3+4*2="
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "3+4*2"
    assert tok.apply_chat_template(msgs, tokenize=True) == tok.encode("3+4*2=")
    # The SENT suffix encodes too.
    tok.encode("Please reason step by step, and put your final answer within \\boxed{}.")


def test_char_save_load(tmp_path):
    CharTokenizer().save(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert isinstance(tok, CharTokenizer)
    assert tok.encode("12+3") == CharTokenizer().encode("12+3")


def test_hf_adapter(tmp_path):
    tok = load_tokenizer(str(make_hf_tokenizer(tmp_path / "hf")))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == 19
    assert tok.eos_token_id == 2 and tok.pad_token_id == 1 and tok.bos_token_id is None
    ids = tok.encode("what is 1 + 2 ?")
    assert ids == [9, 10, 11, 14, 12, 16]  # no special tokens added
    assert tok.decode(ids) == "what is 1 + 2 ?"
    text = tok.apply_chat_template([{"role": "user", "content": "what is 1 + 2 ?"}])
    assert isinstance(text, str)
    assert text == "<|im_start|>user\nwhat is 1 + 2 ?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True)
    assert isinstance(ids, list) and ids[0] == 3 and 4 in ids
    assert tok.stop_token_ids == [2, 4]  # eos, then <|im_end|>


def test_hf_pad_falls_back_to_eos_and_missing_template(tmp_path):
    tok = load_tokenizer(str(make_hf_tokenizer(tmp_path / "hf", chat_template=None, pad=False)))
    assert tok.pad_token_id == tok.eos_token_id == 2
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])


def test_load_tokenizer_bad_path(tmp_path):
    with pytest.raises(ValueError, match="could not load tokenizer"):
        load_tokenizer(str(tmp_path / "nope"))
