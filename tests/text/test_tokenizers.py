"""Tests of the SentencePiece and Hugging Face tokenizers."""

import os

from hypothesis import given, settings, strategies as st
import pytest
import tokenizers as hf

from gr2_jax.errors import UserError
from gr2_jax.text import tokenizers as toks

SID_SYMBOLS = (["<|sid_begin|>", "<|sid_end|>"]
               + [f"<s_{lvl}_{c}>" for lvl in "abcd" for c in range(64)])
_WORDS = ("the movie comedy drama action thriller story love star war toy night day "
          "family adventure romance crime space time return king").split()
# Text that a SentencePiece model can round-trip: no surrogates, no U+2581 (see the class doc).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
               max_size=40)


def _corpus(n=600):
  lines = []
  for i in range(n):
    words = [_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(8 + i % 5)]
    lines.append(" ".join(words) + f" ({1950 + i % 50})")
  return lines


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
  out = tmp_path_factory.mktemp("sp")
  return toks.train_sentencepiece(_corpus(), str(out), vocab_size=700,
                                  user_defined_symbols=SID_SYMBOLS, seed=0)


def _byte_level_hf(added=()):
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus(200), trainer=trainer)
  tok.add_special_tokens(list(added))
  return tok


@pytest.fixture(scope="module")
def hf_tok():
  t = toks.HFTokenizer(_byte_level_hf(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
  t.add_tokens(SID_SYMBOLS)
  return t


def test_sp_layout_of_control_and_sid_tokens(sp_tok):
  # unk 0, eos 1, then the chat tokens and the user symbols in order.
  assert sp_tok.token_to_id("<unk>") == 0
  assert (sp_tok.eos_id, sp_tok.pad_id, sp_tok.bos_id) == (1, 1, None)
  assert (sp_tok.im_start_id, sp_tok.im_end_id) == (2, 3)
  assert sp_tok.token_to_id("<|sid_begin|>") == 4
  assert sp_tok.token_to_id("<s_a_57>") == 4 + 2 + 57
  assert sp_tok.token_to_id("<s_d_4>") == 4 + 2 + 3 * 64 + 4
  assert sp_tok.id_to_token(63) == "<s_a_57>"
  assert sp_tok.token_to_id("<not_a_token>") is None
  assert sp_tok.special_ids == {"<|im_start|>": 2, "<|im_end|>": 3, "<|endoftext|>": 1}


@pytest.mark.parametrize("name", ["sp", "hf"])
def test_sid_and_chat_tokens_are_single_ids(name, sp_tok, hf_tok):
  tok = sp_tok if name == "sp" else hf_tok
  sid = "<|sid_begin|><s_a_57><s_b_7><s_c_23><s_d_4><|sid_end|>"
  expected = [tok.token_to_id(t) for t in
              ["<|sid_begin|>", "<s_a_57>", "<s_b_7>", "<s_c_23>", "<s_d_4>", "<|sid_end|>"]]
  assert None not in expected
  assert tok.encode(sid) == expected
  assert tok.decode(expected) == sid
  ids = tok.encode("<|im_start|>user\nwatch <s_a_1> next<|im_end|>")
  assert ids[0] == tok.im_start_id and ids[-1] == tok.im_end_id
  assert tok.token_to_id("<s_a_1>") in ids
  assert tok.decode(ids) == "<|im_start|>user\nwatch <s_a_1> next<|im_end|>"


@pytest.mark.parametrize("name", ["sp", "hf"])
@pytest.mark.parametrize("text", [
    "Amélie (2001) — Comédie", "日本の映画 🎬🍿", "  two  spaces\nand\ttabs  ", "\x00\x7f", ""])
def test_unicode_round_trip(name, text, sp_tok, hf_tok):
  tok = sp_tok if name == "sp" else hf_tok
  assert tok.decode(tok.encode(text)) == text


def test_sp_pieces_concatenate(sp_tok):
  # No dummy prefix: ids of two strings decode to the two strings joined.
  a, b = "toy story ", " (1995)\n"
  assert sp_tok.decode(sp_tok.encode(a) + sp_tok.encode(b)) == a + b


@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_sp_round_trip_property(sp_tok, text):
  assert sp_tok.decode(sp_tok.encode(text)) == text


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_hf_round_trip_property(hf_tok, text):
  assert hf_tok.decode(hf_tok.encode(text)) == text


def test_sp_training_is_deterministic(tmp_path, sp_tok):
  again = toks.train_sentencepiece(_corpus(), str(tmp_path), vocab_size=700,
                                   user_defined_symbols=SID_SYMBOLS, seed=0)
  with open(os.path.join(tmp_path, toks.SP_MODEL_FILE), "rb") as f:
    assert f.read() == sp_tok._proto  # pylint: disable=protected-access
  assert again.vocab_size == sp_tok.vocab_size


def test_sp_subsampling_follows_the_seed(tmp_path):
  kw = dict(vocab_size=400, input_sentence_size=50, user_defined_symbols=["<x>"])
  a = toks.train_sentencepiece(_corpus(), str(tmp_path / "a"), seed=0, **kw)
  b = toks.train_sentencepiece(_corpus(), str(tmp_path / "b"), seed=0, **kw)
  c = toks.train_sentencepiece(_corpus(), str(tmp_path / "c"), seed=1, **kw)
  # pylint: disable=protected-access
  assert a._proto == b._proto
  assert a._proto != c._proto  # 50 of 600 lines: another seed draws other lines


def test_sp_too_small_vocab_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="vocab_size 300 is too small"):
    toks.train_sentencepiece(_corpus(), str(tmp_path), vocab_size=300,
                             user_defined_symbols=SID_SYMBOLS)
  with pytest.raises(UserError, match="model_type"):
    toks.train_sentencepiece(_corpus(), str(tmp_path), vocab_size=800, model_type="wordpiece")


def test_sp_bpe_trains(tmp_path):
  tok = toks.train_sentencepiece(_corpus(200), str(tmp_path), vocab_size=400,
                                 user_defined_symbols=["<s_a_0>"], model_type="bpe")
  assert tok.encode("<s_a_0>") == [4]
  assert tok.decode(tok.encode("Ünïcode comedy")) == "Ünïcode comedy"


def test_hf_add_tokens_and_missing_control_tokens():
  tok = toks.HFTokenizer(_byte_level_hf())  # no control tokens: they are added
  base = 300
  assert tok.vocab_size == base + 3
  assert {tok.eos_id, tok.im_start_id, tok.im_end_id} == {base, base + 1, base + 2}
  assert tok.add_tokens(["<s_a_0>", "<s_a_1>", "<|im_end|>"]) == 2
  assert tok.vocab_size == base + 5
  assert tok.encode("x<s_a_1>y")[1] == base + 4


def test_save_load_and_load_tokenizer(tmp_path, sp_tok, hf_tok):
  text = "<|im_start|>user\nthe toy story <s_b_3><|im_end|>"
  sp_dir, hf_dir = tmp_path / "sp", tmp_path / "hf"
  sp_tok.save(str(sp_dir))
  hf_tok.save(str(hf_dir))
  sp2 = toks.load_tokenizer(str(sp_dir))
  hf2 = toks.load_tokenizer(str(hf_dir))
  assert isinstance(sp2, toks.SentencePieceTokenizer) and isinstance(hf2, toks.HFTokenizer)
  assert sp2.encode(text) == sp_tok.encode(text)
  assert hf2.encode(text) == hf_tok.encode(text)
  assert hf2.vocab_size == hf_tok.vocab_size
  assert isinstance(toks.load_tokenizer(str(sp_dir / toks.SP_MODEL_FILE)),
                    toks.SentencePieceTokenizer)
  with pytest.raises(UserError, match="does not exist"):
    toks.load_tokenizer(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="holds neither"):
    toks.load_tokenizer(str(tmp_path / "empty"))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
  with pytest.raises(UserError, match="not a valid"):
    toks.load_tokenizer(str(tmp_path / "bad"))


def test_hf_config_keeps_chat_template_and_named_tokens_across_save_and_load(tmp_path):
  template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
              "<|im_end|>\n{% endfor %}")
  config = {"chat_template": template, "eos_token": "<|im_end|>", "add_bos_token": False,
            "added_tokens_decoder": {"0": {}}}  # not one of HF_CONFIG_KEYS: dropped
  tok = toks.HFTokenizer(_byte_level_hf(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), config)
  assert tok.chat_template == template
  assert set(tok.config) == {"chat_template", "eos_token", "add_bos_token"}
  tok.save(str(tmp_path / "a"))
  back = toks.load_tokenizer(str(tmp_path / "a"))
  assert back.config == tok.config
  assert toks.load_tokenizer(str(tmp_path / "a" / toks.HF_TOKENIZER_FILE)).config == tok.config
  # Without a config nothing but tokenizer.json is written, and none comes back.
  toks.HFTokenizer(_byte_level_hf()).save(str(tmp_path / "b"))
  assert os.listdir(tmp_path / "b") == [toks.HF_TOKENIZER_FILE]
  assert toks.load_tokenizer(str(tmp_path / "b")).chat_template is None
  (tmp_path / "b" / toks.HF_CONFIG_FILE).write_text("{oops")
  with pytest.raises(UserError, match="tokenizer_config.json is not valid JSON"):
    toks.load_tokenizer(str(tmp_path / "b"))
