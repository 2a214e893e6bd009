"""The compress stage on the tiny pipeline: GRPO iterations of the compressor, the table of the
re-ranker with the full and the compressed context, and a judge that is down (counted
fallbacks, no crash)."""

import json
import os
import socket

import numpy as np
import pytest

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.compress import context as ctx_lib
from gr2_jax.compress import train as ctrain
from gr2_jax.errors import UserError
from gr2_jax.text import prompts

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def _config(**overrides):
  config = config_lib.load_config_module(os.path.join(CONFIGS, "compress.py")).get_config("tiny")
  config.sids.embedding = "collaborative"  # as the rl stage test, so its artifacts are shared
  for k, v in overrides.items():
    config.compress[k] = v
  return config


def test_tiny_compress_with_a_judge_that_is_down(tiny_workdir):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # nothing listens there once closed
  config = _config(quality="utility+judge")
  config.compress.judge.endpoint = f"http://127.0.0.1:{port}"
  config.compress.judge.max_retries = 1
  config.compress.judge.backoff_s = 0.01
  config.compress.judge.fallback = 0.25
  out, summary = runner.run_stage(config, tiny_workdir, "compress")
  c = config.compress
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  assert [h["iteration"] for h in report["history"]] == list(range(1, c.iterations + 1))
  assert report["warmup"]["steps"] == c.warmup_steps
  assert report["warmup"]["examples"] == c.warmup_examples
  n = c.rollout_prompts * c.group_size
  for h in report["history"]:
    assert h["reward/judge"] == 0.25  # every summary scored with the fallback
    assert 0 <= h["reward/compression"] <= 1 and 0 <= h["reward/utility"] <= 1
  judge = report["judge"]
  assert judge["summaries"] == n * c.iterations
  assert judge["calls"] == 2 * judge["summaries"] and judge["fallbacks"] == judge["summaries"]
  assert judge["failure_kinds"] == {"unreachable": judge["calls"]}
  with open(os.path.join(out, "table.json")) as f:
    table = json.load(f)
  rl_row = "re-ranker RL-trained on compressed contexts, compressed context"
  refs = ("re-ranker, template summary (reference)", "re-ranker, no history (reference)")
  assert set(table["rows"]) == {"legacy", "re-ranker, full context",
                                "re-ranker, compressed context", rl_row, *refs}
  assert set(table["paired"]) == {f"{a} vs re-ranker, full context"
                                  for a in ("re-ranker, compressed context", rl_row, *refs)}
  assert set(table["valid_rate"]) == {"full", "compressed", "rl_compressed", "template", "none"}
  assert 0 < table["reference_kept"]["none"] < table["reference_kept"]["template"]
  assert 1 <= table["distinct"]["summaries"] <= c.eval_examples
  assert 1 <= table["distinct"]["histories"] <= c.eval_examples
  # The re-ranker's RL on full and on compressed contexts: timed, the summaries written apart.
  for name in ("full", "compressed"):
    rl = report["rerank_rl"][name]
    assert [h["iteration"] for h in rl["history"]] == list(range(1, c.rerank_rl_iterations + 1))
    assert ("context_seconds" in rl["history"][0]) == (name == "compressed")
    assert table["rl_timing"][name]["iteration_seconds"] > 0
    assert os.path.isdir(os.path.join(out, f"rerank_rl_{name}", "ckpt"))
  assert table["rl_timing"]["ratio"] == (table["rl_timing"]["compressed"]["iteration_seconds"]
                                         / table["rl_timing"]["full"]["iteration_seconds"])
  assert table["rows"]["legacy"]["R@1"]["n"] == c.eval_examples
  assert table["context_kept_mean"] > 0 and table["timing"]["full_s"] > 0
  assert len(table["samples"]) == 3
  assert len({tuple(s["context"]) for s in table["samples"]}) == 3  # three distinct histories
  assert os.path.isfile(os.path.join(out, "model_config.json"))
  assert summary["context_kept"] == table["context_kept_mean"]


def test_context_tokens_count_the_history_block():
  class Tok:
    def encode(self, text):
      return text.split()
  items = [{"title": f"T{i}", "year": 2000, "genres": ["Drama"]} for i in range(5)]
  sids = [f"<a_{i}><b_{i}>" for i in range(5)]
  slates = {"history": np.array([[-1, 3, 1]]), "history_rating": np.array([[0, 4.0, 5.0]]),
            "slate": np.array([[0, 2]]), "user": np.array([0])}
  cfg = prompts.PromptConfig()
  block = prompts.history_text(prompts.with_sids([3, 1], items, sids), cfg)
  assert ctx_lib.context_tokens(slates, items, sids, cfg, Tok()).tolist() == [len(block.split())]
  assert ctx_lib.summary_tokens(["likes dramas"], Tok()).tolist() == [
      len(prompts.SUMMARY_HEAD.split()) + 2]
  text = ctx_lib.context_text([3, 1], [4.0, 5.0], items)
  assert text.splitlines() == ["History (oldest first):", "T3 (2000) | Drama | rated 4",
                               "T1 (2000) | Drama | rated 5"]


def test_reference_summaries_and_their_names():
  items = [{"title": "A", "year": 1994, "genres": ["Drama"]},
           {"title": "B", "year": 1971, "genres": ["Comedy"]}]
  slates = {"history": np.array([[-1, 0, 1, 1], [0, 0, 0, 1]]),
            "history_rating": np.array([[0, 5.0, 4.0, 3.0], [1.0, 2.0, 3.0, 2.0]]),
            "slate": np.array([[0, 1], [1, 0]])}
  # Read through the last 2 items (max_history 2). Row 0: B twice, rated 4 then 3. Row 1: A
  # rated 3, then B rated 2: genres and decades tie, so the first seen leads (A's).
  assert ctrain.reference_summaries("template", slates, items, 2) == [
      "Likes Comedy; mostly 1970s films; recently enjoyed B.",
      "Likes Drama and Comedy; mostly 1990s films; recently enjoyed A."]
  assert ctrain.reference_summaries("none", slates, items, 2) == [" ", " "]
  c = _config().compress
  assert ctrain.reference_names(c) == ["template", "none"]
  c.reference_rows = " none , "
  assert ctrain.reference_names(c) == ["none"]
  c.reference_rows = ""
  assert ctrain.reference_names(c) == []
  c.reference_rows = "template,oracle"
  with pytest.raises(UserError, match="compress.reference_rows: unknown 'oracle'"):
    ctrain.check_config(c)


def test_score_with_preservation_needs_no_reranker_call():
  class Tok:
    def encode(self, text):
      return text.split()

  class Reranker:  # no orders/aucs: the "preservation" quality must not call the re-ranker
    tok = Tok()
    data = {"items": [{"title": "A", "year": 1994, "genres": ["Drama"]},
                      {"title": "B", "year": 1994, "genres": ["Comedy"]}]}

  c = _config(quality="preservation", alpha=0.5, group_size=2).compress
  batch = {"history": np.array([[0, 0, 0, 1]]), "history_rating": np.array([[5.0] * 4]),
           "slate": np.array([[0, 1]]), "labels": np.array([[1, 0]])}
  texts = ["Likes Drama.", "Likes Comedy in the 1990s."]
  parts, n = ctrain.score(texts, np.array([True, True]), batch, c, Reranker(), None,
                          ["ctx"], np.array([20]), None)
  # Drama 3/4, Comedy 1/4; decades 1990s only. Summary 0: genres 1, no decade 0; summary 1:
  # genres (1/4)/(3/4), decade 1.
  np.testing.assert_allclose(parts["preservation"], [0.5, (1 / 3 + 1) / 2], atol=1e-6)
  head = len(prompts.SUMMARY_HEAD.split())
  comp = 1 - np.array([head + 2, head + 5]) / 20
  np.testing.assert_allclose(parts["compression"], comp, atol=1e-6)
  np.testing.assert_allclose(parts["total"], 0.5 * comp + 0.5 * parts["preservation"],
                             atol=1e-6)
  assert "utility" not in parts and n == {"empty": 0, "overlong": 0}


def test_template_summary():
  items = [{"title": "A", "year": 1994, "genres": ["Drama"]},
           {"title": "B", "year": 1991, "genres": ["Drama", "Comedy"]},
           {"title": "C", "year": 1975, "genres": ["Comedy"]},
           {"title": "D", "year": 2001, "genres": ["Horror"]}]
  # Drama 4, Comedy 3, Horror 1; decades 1990s x 4; the last 5 items lean to Drama, not
  # new; the best-rated of the last 5 is the last one rated 5.
  got = ctx_lib.template_summary([0, 1, 2, 0, 1, 3], [3, 5, 4, 2, 5, 1], items)
  assert got == ("Likes Drama, Comedy and Horror; mostly 1990s films; recently enjoyed B.")
  assert ctx_lib.template_summary([], [], items) == "No clear taste yet."
