"""Tests of the ChatML rendering and the assistant-only loss mask."""

import numpy as np
import pytest
import tokenizers as hf

from gr2_jax.errors import UserError
from gr2_jax.text import chat
from gr2_jax.text import tokenizers as toks

# A word-level tokenizer whose ids are known by hand; "\n" is its own word.
VOCAB = {"<unk>": 0, "system": 1, "user": 2, "assistant": 3, "\n": 4, "sys": 5, "hi": 6,
         "hello": 7, "bye": 8}
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 9, 10, 11
EOT, S, E, NL = 9, 10, 11, 4

MESSAGES = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "bye"},
]


@pytest.fixture(scope="module")
def word_tok():
  tok = hf.Tokenizer(hf.models.WordLevel(VOCAB, unk_token="<unk>"))
  tok.pre_tokenizer = hf.pre_tokenizers.Split(hf.Regex("\n"), behavior="isolated")
  tok.add_special_tokens(CONTROL)
  return toks.HFTokenizer(tok)


def test_render_chat_text():
  msgs = MESSAGES[:3]
  want = ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
          "<|im_start|>assistant\nhello<|im_end|>\n")
  assert chat.render_chat(msgs) == want
  assert chat.render_chat(msgs[:2], add_generation_prompt=True) == (
      "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
      "<|im_start|>assistant\n")


def test_render_for_training_ids_and_mask(word_tok):
  ids, mask = chat.render_for_training(MESSAGES, word_tok)
  want_ids = [S, 1, NL, 5, E, NL,
              S, 2, NL, 6, E, NL,
              S, 3, NL, 7, E, NL,
              S, 2, NL, 8, E, NL,
              S, 3, NL, 8, E, NL]
  want_mask = [0, 0, 0, 0, 0, 0,
               0, 0, 0, 0, 0, 0,
               0, 0, 0, 1, 1, 0,
               0, 0, 0, 0, 0, 0,
               0, 0, 0, 1, 1, 0]
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  assert ids.dtype == np.int32 and mask.dtype == np.int32


def test_encode_chat_generation_prompt(word_tok):
  ids = chat.encode_chat(MESSAGES[:2], word_tok, add_generation_prompt=True)
  assert ids == [S, 1, NL, 5, E, NL, S, 2, NL, 6, E, NL, S, 3, NL]
  assert chat.chat_stop_ids(word_tok) == (E, EOT)


def test_ids_decode_to_rendered_text(tmp_path):
  # With a SentencePiece model the piecewise ids decode to exactly the rendered text.
  lines = ["the user likes comedy and drama", "assistant answers with a ranking"] * 50
  tok = toks.train_sentencepiece(lines, str(tmp_path), vocab_size=400,
                                 user_defined_symbols=["<s_a_1>"])
  msgs = [{"role": "user", "content": "rank <s_a_1> please"},
          {"role": "assistant", "content": "{\"ranking\": [\"<s_a_1>\"]}"}]
  ids, mask = chat.render_for_training(msgs, tok)
  assert tok.decode(ids.tolist()) == chat.render_chat(msgs)
  # The masked tokens decode to the assistant content plus <|im_end|>.
  assert tok.decode(ids[mask == 1].tolist()) == msgs[1]["content"] + "<|im_end|>"
  prompt = chat.encode_chat(msgs[:1], tok, add_generation_prompt=True)
  assert tok.decode(prompt) == chat.render_chat(msgs[:1], add_generation_prompt=True)


@pytest.mark.parametrize("bad, match", [
    ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"role": "user"}], "must be a dict"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ({"role": "user", "content": "x"}, "must be a list"),
])
def test_malformed_messages(bad, match):
  with pytest.raises(UserError, match=match):
    chat.render_chat(bad)
