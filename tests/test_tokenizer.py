import json

import pytest
from hypothesis import given, settings, strategies as st

from openk2.cli import main as cli_main
from openk2.tokenizer import (CONTROL_TOKENS, IM_END, Tokenizer, load_tokenizer, tiny_tokenizer,
                              train_tokenizer)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_tiny_tokenizer_is_cached_and_deterministic(tok):
    assert tiny_tokenizer() is tok
    again = tiny_tokenizer.__wrapped__()  # a fresh training run on the same text
    assert again._tok.to_str() == tok._tok.to_str()
    assert tok.vocab_size == 512


def test_each_control_token_is_one_id_after_the_vocabulary(tok):
    ids = [tok.special_ids[t] for t in CONTROL_TOKENS]
    assert len(set(ids)) == len(CONTROL_TOKENS)
    assert sorted(ids) == list(range(tok.vocab_size - len(CONTROL_TOKENS), tok.vocab_size))
    for t in CONTROL_TOKENS:
        assert tok.token_to_id(t) == tok.special_ids[t] and tok.id_to_token(tok.special_ids[t]) == t
        assert tok.decode([tok.special_ids[t]]) == t
        assert tok.decode([tok.special_ids[t]], skip_special=True) == ""
    assert (tok.im_end_id, tok.eos_id, tok.pad_id, tok.bos_id) == tuple(
        tok.special_ids[t] for t in (IM_END, "[EOS]", "[PAD]", "[BOS]"))


def test_control_token_text_encodes_as_ordinary_tokens(tok):
    specials = set(tok.special_ids.values())
    for t in CONTROL_TOKENS:
        ids = tok.encode(f"a {t} b")
        assert len(ids) > 3 and not specials & set(ids), t
        assert tok.decode(ids) == f"a {t} b"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_unicode_round_trips(s):
    tok = tiny_tokenizer()
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert b"".join(tok.token_bytes(i) for i in ids) == s.encode("utf-8")
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_token_bytes_rejects_unknown_ids(tok):
    with pytest.raises(IndexError):
        tok.token_bytes(tok.vocab_size)
    with pytest.raises(IndexError):
        tok.token_bytes(-1)


def test_train_from_files_and_save_load(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. 1234 déjà vu. " * 300)
    tok = train_tokenizer([corpus], vocab_size=300)
    assert tok.vocab_size == 300 and tok.special_ids["<|reserved_token_0|>"] < tok.bos_id
    tok.save(tmp_path / "out")
    back = load_tokenizer(tmp_path / "out")
    text = "the mat <|im_end|> vu 99"
    assert back.encode(text) == tok.encode(text) and back.special_ids == tok.special_ids
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert cfg["chat_template"] == tok.chat_template and "tool_declare" in cfg["chat_template"]
    assert gen["eos_token_id"] == tok.im_end_id
    # the saved tokenizer.json parses control tokens in text (what other servers need)
    from tokenizers import Tokenizer as HFTokenizer
    raw = HFTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert raw.encode("<|im_end|>", add_special_tokens=False).ids == [tok.im_end_id]


def test_save_keeps_other_generation_config_fields(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"temperature": 1.0, "eos_token_id": 5}')
    tiny_tokenizer().save(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["temperature"] == 1.0 and gen["eos_token_id"] == tiny_tokenizer().im_end_id


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(iter(["abc"]), vocab_size=100)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer([tmp_path / "nope.txt"], vocab_size=300)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    (tmp_path / "tiktoken.model").write_text("")
    with pytest.raises(ValueError, match="tiktoken"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="str"):
        tiny_tokenizer().encode(b"bytes")


def test_a_tokenizer_without_control_tokens_is_refused():
    from tokenizers import Tokenizer as HFTokenizer, models
    with pytest.raises(ValueError, match="control tokens"):
        Tokenizer(HFTokenizer(models.BPE()))


def test_cli_tokenizer_train(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, the quick brown fox. 12345\n" * 200)
    assert cli_main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "t")]) == 0
    assert "300-id tokenizer" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "t").vocab_size == 300
    assert cli_main(["tokenizer", "train", str(tmp_path / "missing.txt"), "--vocab-size", "300",
                     "--out", str(tmp_path / "u")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_a_word_is_the_same_tokens_wherever_it_stands():
    """Copying a key or a name must be copying tokens: the word's pieces may not depend on the
    character before it (a space in a tool output, a quote in JSON arguments, nothing after <think>)."""
    tok = train_tokenizer(iter(["next: tevimu; the key tevimu, Pavul Zeben (id: pavul-zeben) 1936"] * 50), 400)
    word = tok.encode("tevimu")
    for context in ("next: {}", '{{"key":"{}"}}', "{}.", "(id: {})", "Link 3: {}"):
        ids = tok.encode(context.format("tevimu"))
        assert any(ids[i:i + len(word)] == word for i in range(len(ids))), context
    assert tok.encode("1936") == [tok.encode(d)[0] for d in "1936"]   # digits one by one
