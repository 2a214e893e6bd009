"""Tests of the re-ranking prompt rendering: hand-written expected texts."""

import dataclasses
import json

import pytest

from gr2_jax.errors import UserError
from gr2_jax.sids import tokens
from gr2_jax.text import chat
from gr2_jax.text import prompts

S = [tokens.sid_tokens((i, i + 1)) for i in range(5)]
HISTORY = [
    {"sid": S[0], "title": "Toy Story", "year": 1995, "genres": ["Animation", "Comedy"]},
    {"sid": S[1], "title": "Heat", "year": 1995, "genres": ["Action", "Crime"]},
]
SLATE = [
    {"sid": S[2], "title": "Fargo", "year": 1996, "genres": ["Crime", "Drama"]},
    {"sid": S[3], "title": "Babe", "year": 1995, "genres": ["Children's"]},
    {"sid": S[4], "title": "Alien", "year": 1979, "genres": ["Horror", "Sci-Fi"]},
]
USER = {"age": 25, "gender": "F", "occupation": -1}

SYSTEM_REASONING = (
    "You are a recommendation analyst. Rank the candidate movies by how likely the user "
    "watches each next, most likely first.\n"
    "Items: SID title (year) | genres.\n"
    "Explain in three steps citing SIDs: history patterns, matching candidates, choice.\n"
    'Answer JSON only: {"explanation": "...", "recommendations": [SID, ...]}, every candidate '
    "once.")
SYSTEM_PLAIN = (
    "You are a recommendation analyst. Rank the candidate movies by how likely the user "
    "watches each next, most likely first.\n"
    "Items: SID title (year) | genres.\n"
    'Answer JSON only: {"recommendations": [SID, ...]}, every candidate once.')
CONTEXT = ("User: age 25, gender F\n"
           "History (oldest first):\n"
           "<|sid_begin|><s_a_0><s_b_1><|sid_end|> Toy Story (1995) | Animation, Comedy\n"
           "<|sid_begin|><s_a_1><s_b_2><|sid_end|> Heat (1995) | Action, Crime")
CANDIDATES = ("Candidates (3):\n"
              "<|sid_begin|><s_a_2><s_b_3><|sid_end|> Fargo (1996) | Crime, Drama\n"
              "<|sid_begin|><s_a_3><s_b_4><|sid_end|> Babe (1995) | Children's\n"
              "<|sid_begin|><s_a_4><s_b_5><|sid_end|> Alien (1979) | Horror, Sci-Fi")


@pytest.mark.parametrize("order,reasoning", [("system_user_candidates", True),
                                             ("system_user_candidates", False),
                                             ("system_candidates_user", True),
                                             ("system_candidates_user", False)])
def test_build_messages_by_hand(order, reasoning):
  cfg = prompts.PromptConfig(part_order=order, reasoning=reasoning)
  msgs = prompts.build_messages(HISTORY, SLATE, cfg, user=USER)
  user = (CONTEXT + "\n" + CANDIDATES if order == "system_user_candidates"
          else CANDIDATES + "\n" + CONTEXT)
  assert msgs == [{"role": "system", "content": SYSTEM_REASONING if reasoning else SYSTEM_PLAIN},
                  {"role": "user", "content": user}]


def test_candidates_first_prefix_is_shared_across_users():
  cfg = prompts.PromptConfig(part_order="system_candidates_user")
  a = chat.render_chat(prompts.build_messages(HISTORY, SLATE, cfg, user=USER))
  b = chat.render_chat(prompts.build_messages(HISTORY[:1], SLATE, cfg, user={"age": 50}))
  prefix = "<|im_start|>system\n" + SYSTEM_REASONING + "<|im_end|>\n<|im_start|>user\n" + CANDIDATES
  assert a.startswith(prefix) and b.startswith(prefix)
  assert a != b


def test_history_cap_keeps_most_recent_and_user_features_optional():
  cfg = prompts.PromptConfig(max_history=1, include_user=False)
  user = prompts.build_messages(HISTORY, SLATE, cfg, user=USER)[1]["content"]
  assert user.splitlines()[:2] == [
      "History (oldest first):",
      "<|sid_begin|><s_a_1><s_b_2><|sid_end|> Heat (1995) | Action, Crime"]
  assert "Toy Story" not in user and "User:" not in user


def test_item_fields_subset():
  cfg = prompts.PromptConfig(item_fields=("sid", "title"))
  assert prompts.item_line(SLATE[0], cfg) == "<|sid_begin|><s_a_2><s_b_3><|sid_end|> Fargo"


def test_render_answer_and_assistant_turn():
  ans = prompts.render_answer([S[3], S[2]], explanation="Crime fan.")
  assert json.loads(ans) == {"explanation": "Crime fan.", "recommendations": [S[3], S[2]]}
  assert ans == ('{"explanation": "Crime fan.", "recommendations": '
                 '["<|sid_begin|><s_a_3><s_b_4><|sid_end|>", '
                 '"<|sid_begin|><s_a_2><s_b_3><|sid_end|>"]}')
  assert prompts.render_answer([S[2]]) == '{"recommendations": ["' + S[2] + '"]}'
  msgs = prompts.build_messages(HISTORY, SLATE, prompts.PromptConfig(), answer=ans)
  assert msgs[-1] == {"role": "assistant", "content": ans}


def test_with_sids():
  items = [{"id": 0, "title": "A"}, {"id": 1, "title": "B"}]
  assert prompts.with_sids([1], items, ["s0", "s1"]) == [{"id": 1, "title": "B", "sid": "s1"}]


@pytest.mark.parametrize("kwargs", [{"part_order": "user_first"}, {"item_fields": ("title",)},
                                    {"item_fields": ("sid", "plot")}, {"max_history": 0}])
def test_bad_config_is_user_error(kwargs):
  with pytest.raises(UserError):
    prompts.PromptConfig(**kwargs)


@pytest.mark.parametrize("fields,legend", [(("sid",), "SID"), (("sid", "genres"), "SID | genres"),
                                           (("sid", "year", "genres"), "SID (year) | genres"),
                                           (("sid", "title"), "SID title")])
def test_system_turn_describes_the_item_fields(fields, legend):
  cfg = prompts.PromptConfig(item_fields=fields)
  assert f"Items: {legend}.\n" in prompts.system_text(cfg)
  line = prompts.item_line(dict(SLATE[0]), cfg)
  assert line.startswith(S[2]) and ("Fargo" in line) == ("title" in fields)


SYSTEM_POSITIONS = (
    "You are a recommendation analyst. Rank the candidate movies by how likely the user "
    "watches each next, most likely first.\n"
    "Items: SID title (year) | genres.\n"
    "Explain in three steps citing SIDs: history patterns, matching candidates, choice.\n"
    'Answer JSON only: {"explanation": "...", "recommendations": [number, ...]}, every '
    "candidate's number once.")


def test_positions_format_numbers_the_candidates_only():
  cfg = prompts.PromptConfig(answer_format="positions")
  msgs = prompts.build_messages(HISTORY, SLATE, cfg, user=USER)
  assert msgs[0]["content"] == SYSTEM_POSITIONS
  assert msgs[1]["content"] == CONTEXT + "\n" + (
      "Candidates (3):\n"
      "1. <|sid_begin|><s_a_2><s_b_3><|sid_end|> Fargo (1996) | Crime, Drama\n"
      "2. <|sid_begin|><s_a_3><s_b_4><|sid_end|> Babe (1995) | Children's\n"
      "3. <|sid_begin|><s_a_4><s_b_5><|sid_end|> Alien (1979) | Horror, Sci-Fi")
  plain = prompts.system_text(dataclasses.replace(cfg, reasoning=False))
  assert plain.endswith('Answer JSON only: {"recommendations": [number, ...]}, every '
                        "candidate's number once.")


def test_recommendations_in_both_formats():
  sids = [S[2], S[3], S[4]]
  assert prompts.recommendations((2, 0, 1), sids) == [S[4], S[2], S[3]]
  assert prompts.recommendations((2, 0, 1), sids, "positions") == [3, 1, 2]
  ans = prompts.render_answer(prompts.recommendations((2, 0, 1), sids, "positions"), "why")
  assert ans == '{"explanation": "why", "recommendations": [3, 1, 2]}'


def test_unknown_answer_format_is_user_error():
  with pytest.raises(UserError, match="answer_format must be one of sids, positions, positions0"):
    prompts.PromptConfig(answer_format="numbers")


def test_positions0_numbers_the_candidates_from_zero():
  cfg = prompts.PromptConfig(answer_format="positions0")
  msgs = prompts.build_messages(HISTORY, SLATE, cfg, user=USER)
  assert msgs[0]["content"] == SYSTEM_POSITIONS
  assert msgs[1]["content"].endswith(
      "Candidates (3):\n"
      "0. <|sid_begin|><s_a_2><s_b_3><|sid_end|> Fargo (1996) | Crime, Drama\n"
      "1. <|sid_begin|><s_a_3><s_b_4><|sid_end|> Babe (1995) | Children's\n"
      "2. <|sid_begin|><s_a_4><s_b_5><|sid_end|> Alien (1979) | Horror, Sci-Fi")
  assert prompts.recommendations((2, 0, 1), [S[2], S[3], S[4]], "positions0") == [2, 0, 1]


def test_number_again_ends_each_candidate_line_with_its_number():
  cfg = prompts.PromptConfig(answer_format="positions", number_again=True,
                             part_order="system_candidates_user")
  msgs = prompts.build_messages(HISTORY, SLATE, cfg, user=USER)
  assert msgs[1]["content"] == (
      "Candidates (3):\n"
      "1. <|sid_begin|><s_a_2><s_b_3><|sid_end|> Fargo (1996) | Crime, Drama -> 1\n"
      "2. <|sid_begin|><s_a_3><s_b_4><|sid_end|> Babe (1995) | Children's -> 2\n"
      "3. <|sid_begin|><s_a_4><s_b_5><|sid_end|> Alien (1979) | Horror, Sci-Fi -> 3\n" + CONTEXT)
  with pytest.raises(UserError, match="number_again .* needs a numbered answer_format"):
    prompts.PromptConfig(number_again=True)


def test_numbered_answers_may_leave_the_sids_out():
  cfg = prompts.PromptConfig(answer_format="positions0", item_fields=("title", "year", "genres"),
                             reasoning=False)
  msgs = prompts.build_messages(HISTORY, SLATE, cfg, user=USER)
  assert "Items: title (year) | genres." in msgs[0]["content"]
  assert msgs[1]["content"] == (
      "User: age 25, gender F\n"
      "History (oldest first):\n"
      "Toy Story (1995) | Animation, Comedy\n"
      "Heat (1995) | Action, Crime\n"
      "Candidates (3):\n"
      "0. Fargo (1996) | Crime, Drama\n"
      "1. Babe (1995) | Children's\n"
      "2. Alien (1979) | Horror, Sci-Fi")
  for kwargs in ({"reasoning": False}, {"answer_format": "positions", "reasoning": True}):
    with pytest.raises(UserError, match="must include 'sid' unless the answer is numbered"):
      prompts.PromptConfig(item_fields=("title", "year"), **kwargs)
