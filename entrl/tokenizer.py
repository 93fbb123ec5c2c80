"""Tokenizers behind one small interface: Hugging Face tokenizers and the demo's character tokenizer.

Design decisions:
- Everything in entrl talks to a tokenizer through the same seven members:
  `encode(text) -> list[int]` (never adds special tokens: prompts are rendered
  by the chat template, which already places any BOS/role tokens as text),
  `decode(ids, skip_special_tokens=True)`, `eos_token_id`, `pad_token_id`,
  `bos_token_id` (may be None), `vocab_size`, `apply_chat_template(messages,
  tokenize=False, add_generation_prompt=True)` and `stop_token_ids`.
- Hugging Face tokenizers are wrapped in `HFTokenizer`, a thin adapter. It never
  calls `apply_chat_template(tokenize=True)` (transformers v5 returns a
  BatchEncoding there); tokenizing a chat means rendering it to text and calling
  `encode`, which also parses special tokens written in the text. A tokenizer
  without a pad token pads with EOS (pads are always masked, so the id only has
  to be valid).
- `stop_token_ids` is EOS plus the end-of-turn tokens of the common chat formats
  (`<|im_end|>`, `<|eot_id|>`, ...) that exist in the vocabulary, because chat
  models end their answers with those rather than with EOS.
- `CharTokenizer` is a fixed, deterministic character vocabulary
  for the synthetic arithmetic task: 57 entries, `<pad>`=0, `<bos>`=1, `<eos>`=2, digits,
  the arithmetic operators, whitespace, `\\ { }` for `\\boxed{}`, the lowercase
  alphabet and a few punctuation marks (so the SENT prompt suffix also
  encodes). Unknown characters raise a ValueError naming all of them. Its
  chat template joins the message contents with newlines and, for a
  generation prompt, appends `=`: `3+4*2` becomes the prompt `3+4*2=`, after
  which the model writes its worked solution. It saves to / loads from a
  directory (`char_tokenizer.json`) so an exported demo run carries it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

CHAR_TOKENIZER_FILE = "char_tokenizer.json"
CHAR_SPECIALS = ("<pad>", "<bos>", "<eos>")
# Order matters: ids are positions in this string (after the three specials).
CHAR_ALPHABET = "0123456789+-*/=(),. \n\\{}:?AP" + "abcdefghijklmnopqrstuvwxyz"
CHAR_GENERATION_MARKER = "="

# End-of-turn tokens of common chat formats (ChatML/Qwen, Llama 3, DeepSeek, Gemma, GPT-2 family).
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
    "<end_of_turn>",
)


@runtime_checkable
class Tokenizer(Protocol):
    """The tokenizer interface every entrl module uses."""

    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str | list[int]: ...

    @property
    def stop_token_ids(self) -> list[int]: ...


# ---------------------------------------------------------------------------
# Character tokenizer (demo task)
# ---------------------------------------------------------------------------


class CharTokenizer:
    """Deterministic character-level tokenizer for the synthetic arithmetic task."""

    def __init__(self, alphabet: str = CHAR_ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            dup = sorted({c for c in alphabet if alphabet.count(c) > 1})
            raise ValueError(f"CharTokenizer alphabet has duplicate characters {dup!r}")
        self.alphabet = alphabet
        self._itos = list(CHAR_SPECIALS) + list(alphabet)
        self._stoi = {c: i + len(CHAR_SPECIALS) for i, c in enumerate(alphabet)}
        self.pad_token_id = 0
        self.bos_token_id: int | None = 1
        self.eos_token_id = 2
        self.vocab_size = len(self._itos)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.eos_token_id]

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[ch] for ch in text]
        except KeyError:
            unknown = sorted({ch for ch in text if ch not in self._stoi})
            first = min(text.index(ch) for ch in unknown)
            raise ValueError(
                f"CharTokenizer: characters {''.join(unknown)!r} (first at position {first} of {text[:60]!r}) are "
                f"not in its vocabulary {self.alphabet!r}"
            ) from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = []
        for tid in ids:
            tid = int(tid)
            if not 0 <= tid < self.vocab_size:
                raise ValueError(f"CharTokenizer: token id {tid} out of range [0, {self.vocab_size})")
            if tid < len(CHAR_SPECIALS):
                if not skip_special_tokens:
                    out.append(self._itos[tid])
                continue
            out.append(self._itos[tid])
        return "".join(out)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str | list[int]:
        """Contents joined with newlines (roles are not rendered), plus `=` for a generation prompt."""
        if not messages:
            raise ValueError("apply_chat_template: messages is empty")
        text = "\n".join(m["content"] for m in messages)
        if add_generation_prompt:
            text += CHAR_GENERATION_MARKER
        return self.encode(text) if tokenize else text

    def save(self, directory: str | Path) -> Path:
        """Write `char_tokenizer.json` into `directory` (created if needed); returns the file path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CHAR_TOKENIZER_FILE
        path.write_text(json.dumps({"type": "entrl_char", "specials": list(CHAR_SPECIALS), "alphabet": self.alphabet}))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        path = Path(directory) / CHAR_TOKENIZER_FILE
        spec = json.loads(path.read_text())
        if spec.get("type") != "entrl_char" or spec.get("specials") != list(CHAR_SPECIALS):
            raise ValueError(f"{path}: not an entrl character tokenizer file")
        return cls(spec["alphabet"])


# ---------------------------------------------------------------------------
# Hugging Face adapter
# ---------------------------------------------------------------------------


class HFTokenizer:
    """Adapter giving a `transformers` tokenizer the entrl tokenizer interface."""

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                f"tokenizer {hf_tokenizer.name_or_path!r} has no EOS token: set `eos_token` in its "
                "tokenizer_config.json (generation cannot stop without one)"
            )
        self.eos_token_id: int = int(eos)
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id: int = int(pad) if pad is not None else self.eos_token_id
        bos = hf_tokenizer.bos_token_id
        self.bos_token_id: int | None = int(bos) if bos is not None else None
        self.vocab_size: int = len(hf_tokenizer)
        stops = [self.eos_token_id]
        vocab = hf_tokenizer.get_vocab()
        for tok in _END_OF_TURN_TOKENS:
            tid = vocab.get(tok)
            if tid is not None and tid not in stops:
                stops.append(int(tid))
        self._stop_token_ids = stops

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer({self.hf.name_or_path!r}, vocab_size={self.vocab_size})"

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._stop_token_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str | list[int]:
        if not getattr(self.hf, "chat_template", None):
            raise ValueError(
                f"tokenizer {self.hf.name_or_path!r} has no chat template: use a tokenizer that has one, "
                "or set data.chat_template=false to feed raw prompts"
            )
        text = self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
        if not isinstance(text, str):
            raise ValueError(f"chat template of {self.hf.name_or_path!r} rendered {type(text).__name__}, expected str")
        return self.encode(text) if tokenize else text

    def save(self, directory: str | Path) -> Path:
        """`save_pretrained` into `directory`; returns it."""
        directory = Path(directory)
        self.hf.save_pretrained(str(directory))
        return directory


def load_tokenizer(name_or_path: str | Path) -> CharTokenizer | HFTokenizer:
    """`"char"` -> the built-in CharTokenizer; a directory holding `char_tokenizer.json` -> that
    CharTokenizer; anything else -> `transformers.AutoTokenizer.from_pretrained` (local dir or hub id)."""
    name = str(name_or_path)
    if name == "char":
        return CharTokenizer()
    if not name:
        raise ValueError("load_tokenizer: empty name; pass a tokenizer dir, a hub id, or 'char'")
    if (Path(name) / CHAR_TOKENIZER_FILE).is_file():
        return CharTokenizer.load(name)
    from transformers import AutoTokenizer  # noqa: PLC0415 (seconds to import; the character tokenizer needs none)

    try:
        hf = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load tokenizer {name!r}: {e}. Pass a local tokenizer dir, a hub id, or 'char'"
        ) from e
    return HFTokenizer(hf)
