"""Byte-level BPE tokenizer with the Kimi K2 control tokens.

Why byte-level BPE: every string (any Unicode, any bytes a tool prints) maps to tokens and back
exactly, with no unknown token. The control tokens of the K2 chat format (`<|im_end|>`, `<think>`,
the tool-call markers ...) are single special tokens placed after the trained vocabulary, as in K2.

Two rules matter to the rest of openk2:
- `encode(text)` never parses special tokens: text that spells `<|im_end|>` (a user message, a tool
  output) becomes ordinary tokens, so it cannot forge a turn. Control tokens enter a sequence only
  by id, through `openk2.chat.render_ids`.
- `token_bytes(id)` gives each token's raw bytes, so a streaming decoder can reassemble characters
  split across tokens.

The tokenizer is stored as Hugging Face `tokenizer.json` (the `tokenizers` library), so vLLM,
SGLang and transformers read it. The real Kimi K2 ships a tiktoken file (`tiktoken.model`) instead;
loading it later means converting its ranks to a BPE tokenizer.json (same byte-level scheme, K2's
split regex, control tokens at ids 163584+) and wrapping it in this same class, with
`k2_compat=True` so `render_ids` picks the K2 template. Nothing here depends on the vocabulary
layout beyond `special_ids`.

The `tokenizers` library is imported lazily: `openk2.chat` imports the token names from here and
must stay cheap to import.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Iterable

# The control tokens, in the order they are appended after the trained vocabulary (K2 keeps a
# similar order at ids 163584+). Names are the real checkpoints' strings.
BOS, EOS, PAD = "[BOS]", "[EOS]", "[PAD]"
IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>")
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
THINK, THINK_END = "<think>", "</think>"
CONTROL_TOKENS = (BOS, EOS, IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE, SECTION_BEGIN,
                  SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END, THINK, THINK_END, PAD)

# Pre-tokenizer split: GPT-4/K2 style (contractions, letter runs, punctuation runs with an optional
# leading space, newline runs, whitespace) with two changes for small models that must copy:
# - digits are split one by one (numbers are copied and compared digit by digit);
# - a letter run never carries the character before it (GPT-4 merges " favudi" and "\"favudi"
#   into different tokens). A word is then the same token sequence wherever it stands: in a tool
#   output after a space, in JSON arguments after a quote, at the start of the reasoning. With the
#   old rule k2-nano had to learn that " tev"+"imu" and "t"+"ev"+"imu" spell the same key, for keys
#   it had never seen; with this one, copying a name is copying tokens. It costs ~1.3x the tokens
#   on gym text (a space between two words is a token of its own).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode map, inverted (what ByteLevel BPE stores in its vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """A `tokenizers.Tokenizer` with openk2's rules (see the module docstring).

    Attributes: `vocab_size` (including control tokens), `special_ids` (token string -> id for every
    special token: the control tokens and any unused `<|reserved_token_K|>`), and shortcuts
    `bos_id`, `eos_id`, `pad_id`, `im_end_id`. `k2_compat` says which
    chat template belongs to this vocabulary (False: openk2's own models).
    """

    k2_compat = False

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self._tok.encode_special_tokens = True  # special-token parsing off for all text we encode
        missing = [t for t in CONTROL_TOKENS if hf_tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the K2 control tokens {missing}")
        added = hf_tokenizer.get_added_tokens_decoder()
        self.special_ids = {t.content: i for i, t in sorted(added.items()) if t.special}
        self.bos_id, self.eos_id, self.pad_id = (self.special_ids[t] for t in (BOS, EOS, PAD))
        self.im_end_id = self.special_ids[IM_END]
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self._bytes: list[bytes] | None = None
        # Rendering re-encodes the same pieces many times (headers, tool declarations, and every
        # message of a long trajectory once per agent view): remember recent ones.
        self._encode_cached = functools.lru_cache(maxsize=1 << 16)(self._encode)

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self._tok.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; control-token text stays ordinary tokens."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return list(self._encode_cached(text))

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(id)

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token (control tokens: their UTF-8 text). Raises IndexError if unknown."""
        if self._bytes is None:
            dec = _byte_decoder()
            specials = set(self.special_ids.values())
            table = []
            for i in range(self.vocab_size):
                tok = self._tok.id_to_token(i)
                if tok is None:
                    table.append(b"")
                elif i in specials:
                    table.append(tok.encode())
                else:
                    table.append(bytes(dec[c] for c in tok))
            self._bytes = table
        if not 0 <= id < len(self._bytes):
            raise IndexError(f"token id {id} outside the vocabulary (size {len(self._bytes)})")
        return self._bytes[id]

    @property
    def chat_template(self) -> str:
        from openk2.chat import chat_template
        return chat_template(k2_compat=self.k2_compat)

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json (with the Jinja chat template) and
        generation_config.json (stop at `<|im_end|>`) so transformers/vLLM/SGLang can serve a
        checkpoint in `directory`. An existing generation_config.json keeps its other fields."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))  # encode_special_tokens is not serialised
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
            "added_tokens_decoder": {
                str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
                for t, i in sorted(self.special_ids.items(), key=lambda kv: kv[1])},
            "additional_special_tokens": [t for t in CONTROL_TOKENS if t not in (BOS, EOS, PAD)],
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 20,
            "chat_template": self.chat_template,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        gen_path = d / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        gen.update({"bos_token_id": self.bos_id, "eos_token_id": self.im_end_id,
                    "pad_token_id": self.pad_id})
        gen_path.write_text(json.dumps(gen, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, im_end_id={self.im_end_id})"


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer stored next to a checkpoint (tokenizer.json)."""
    from tokenizers import Tokenizer as HFTokenizer
    d = Path(directory)
    if (d / "tokenizer.json").is_file():
        return Tokenizer(HFTokenizer.from_file(str(d / "tokenizer.json")))
    if (d / "tiktoken.model").is_file():
        raise ValueError(f"{d}: the real K2 tokenizer (tiktoken.model) is not supported yet; "
                         "convert it to tokenizer.json first")
    raise FileNotFoundError(f"{d}: no tokenizer.json")


def train_tokenizer(files_or_iterator, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of `vocab_size` ids in total (control tokens included).

    `files_or_iterator`: a path or a list/tuple of text file paths, or any other iterable (a
    generator, `iter(list_of_texts)`) yielding text. Deterministic for a given corpus. If the corpus
    is too small to learn that many merges, unused special tokens `<|reserved_token_K|>` fill the
    gap (as in K2), so the size is exact and the control tokens are always the last ids.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer
    n_base = vocab_size - len(CONTROL_TOKENS)
    if n_base < 256:
        raise ValueError(f"vocab_size {vocab_size} too small: need 256 byte tokens + {len(CONTROL_TOKENS)} control tokens")
    if isinstance(files_or_iterator, (str, os.PathLike)):
        files_or_iterator = [files_or_iterator]
    if isinstance(files_or_iterator, (list, tuple)):
        corpus = _read_files(files_or_iterator)
    else:
        corpus = files_or_iterator
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_base, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    reserved = [f"<|reserved_token_{k}|>" for k in range(n_base - tok.get_vocab_size())]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in reserved])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    return Tokenizer(tok)


def _read_files(paths):
    missing = [str(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"corpus file(s) not found: {', '.join(missing)}")
    return _iter_files(paths)


def _iter_files(paths):
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            while chunk := f.read(1 << 20):
                yield chunk


# A small built-in corpus for tiny_tokenizer: English, numbers, JSON, code, the chat format's words,
# and some non-Latin text, so tests exercise multi-byte characters and ordinary merges.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A user asks a question; the assistant thinks, calls a
tool, reads the result, and answers. What is 17 * 23? Let me compute: 17 * 23 = 391.
{"name": "calculator", "arguments": {"expression": "12 + 30"}} {"query": "weather in Paris"}
def add(a, b):\n    return a + b\n\nprint(add(2, 3))\nfor i in range(10):\n    print(i)
SELECT name, value FROM items WHERE id = 42 ORDER BY name;
system user assistant tool functions lookup search open python sql calculator key value
## Return of functions.lookup:0\nThe next key is k7. Answer: 1234567890.
Thinking step by step: first, then, so, therefore, the answer is.
Les élèves étudient à l'école. Größe über Straße. 你好，世界。こんにちは。Привет, мир! 🙂👍
"""


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    """A deterministic ~512-id tokenizer trained on a small built-in text in a few milliseconds.
    For tests (engine, server, agent, ...): cached per process, do not mutate."""
    return train_tokenizer(iter([_TINY_CORPUS] * 4), vocab_size=512)
