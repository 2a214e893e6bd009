"""Tests of SID token strings, the unified item format and the SID table."""

import json

import pytest

from gr2_jax.errors import UserError
from gr2_jax.sids import tokens


def test_sid_tokens_letters_levels():
  assert (tokens.sid_tokens((57, 7, 23, 4))
          == "<|sid_begin|><s_a_57><s_b_7><s_c_23><s_d_4><|sid_end|>")


def test_all_sid_tokens_order_and_count():
  vocab = tokens.all_sid_tokens(3, 4)
  assert len(vocab) == 2 + 3 * 4
  assert vocab[:4] == ["<|sid_begin|>", "<|sid_end|>", "<s_a_0>", "<s_a_1>"]
  assert vocab[-1] == "<s_c_3>"
  assert len(set(vocab)) == len(vocab)


def test_parse_sid_roundtrip_and_rejects():
  assert tokens.parse_sid("pick " + tokens.sid_tokens((1, 2, 3, 0)) + " next") == (1, 2, 3, 0)
  assert tokens.parse_sid("no sid here") is None
  assert tokens.parse_sid("<|sid_begin|><s_b_1><s_a_2><|sid_end|>") is None  # out of order
  assert tokens.parse_sid("<|sid_begin|><s_a_1><s_b_2>") is None  # unterminated


def test_format_item():
  item = {"title": "Toy Story", "year": 1995, "genres": ["Animation", "Children's", "Comedy"]}
  sid = tokens.sid_tokens((1, 2))
  assert (tokens.format_item(item, sid)
          == sid + " Toy Story (1995) | Animation, Children's, Comedy")
  assert tokens.format_item(dict(item, year=None), sid, ("title",)) == sid + " Toy Story"


def test_sid_table_save_load(tmp_path):
  items = [{"id": 0, "key": "A (1990)"}, {"id": 1, "key": "B (1991)"}]
  tokens.save_sid_table(str(tmp_path / "sid_table.json"), items, [[1, 2, 0], [1, 2, 1]], 2, 8)
  table = tokens.load_sid_table(str(tmp_path))
  assert table["num_levels"] == 3 and table["num_learned"] == 2
  assert table["codebook_size"] == 8
  assert table["items"][1] == {"id": 1, "key": "B (1991)", "codes": [1, 2, 1],
                               "sid": "<|sid_begin|><s_a_1><s_b_2><s_c_1><|sid_end|>"}


def test_load_sid_table_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    tokens.load_sid_table(str(tmp_path / "missing.json"))
  bad = tmp_path / "sid_table.json"
  bad.write_text(json.dumps({"items": []}))
  with pytest.raises(UserError, match="num_levels"):
    tokens.load_sid_table(str(bad))
