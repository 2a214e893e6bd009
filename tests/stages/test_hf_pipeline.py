"""The whole tiny pipeline started from a Hugging Face Qwen3 checkpoint
(`--config.midtrain.hf_checkpoint=DIR`): a small random model exported by `hf_io` with a
byte-level BPE `tokenizer.json` stands in for a downloaded one."""

import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.data import slates as slates_lib
from gr2_jax.models import artifact
from gr2_jax.models import hf_io
from gr2_jax.models import qwen3
from gr2_jax.sids import tokens as sid_lib
from gr2_jax.text import tokenizers
from tests.text.test_tokenizers import _byte_level_hf

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
# A shape no preset has, so the test sees that the checkpoint, not `model_preset`, was used.
SHAPE = dict(hidden_size=48, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=24,
             mlp_dim=96)


def _checkpoint(path):
  tok = _byte_level_hf(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  cfg = qwen3.ModelConfig(vocab_size=tok.get_vocab_size(with_added_tokens=True), **SHAPE)
  hf_io.export_hf_checkpoint(qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)), cfg, path)
  tok.save(os.path.join(path, "tokenizer.json"))
  return tok, cfg


def test_pipeline_runs_from_a_hugging_face_checkpoint(tiny_workdir, tmp_path):
  base_tok, base_cfg = _checkpoint(str(tmp_path / "qwen3"))
  config = config_lib.load_config_module(os.path.join(CONFIGS, "rl.py")).get_config("tiny")
  config.sids.embedding = "collaborative"  # as the other stage tests, so artifacts are shared
  config.midtrain.hf_checkpoint = str(tmp_path / "qwen3")
  out, _ = runner.run_stage(config, tiny_workdir, "rl")

  midtrain_dir = runner.artifact_dir(tiny_workdir, config, "midtrain")
  tok = tokenizers.load_tokenizer(os.path.join(midtrain_dir, "tokenizer"))
  assert isinstance(tok, tokenizers.HFTokenizer)
  # The checkpoint's own ids are kept and every SID token was added after them.
  text = "the movie drama history"
  assert tok.encode(text) == base_tok.encode(text, add_special_tokens=False).ids
  table = sid_lib.load_sid_table(runner.artifact_dir(tiny_workdir, config, "sids"))
  sid_tokens = {t for row in table["items"] for t in re.findall(r"<[^<>]+>", row["sid"])}
  ids = [tok.token_to_id(t) for t in sid_tokens]
  assert None not in ids and min(ids) >= base_cfg.vocab_size
  # The trained model has the checkpoint's shape and an embedding row for every token.
  with open(os.path.join(midtrain_dir, "model_config.json")) as f:
    model_cfg = json.load(f)
  assert {k: model_cfg[k] for k in SHAPE} == SHAPE
  assert model_cfg["vocab_size"] >= tok.vocab_size
  # SFT and RL inherit that tokenizer, and the final table scores both models on the slates.
  sft_dir = runner.artifact_dir(tiny_workdir, config, "sft")
  for d in (sft_dir, out):
    assert isinstance(tokenizers.load_tokenizer(os.path.join(d, "tokenizer")),
                      tokenizers.HFTokenizer)
  with open(os.path.join(out, "table.json")) as f:
    result = json.load(f)
  # Mid-training and SFT from the checkpoint lower their training loss.
  for stage in ("midtrain", "sft"):
    summary = runner.read_summary(runner.artifact_dir(tiny_workdir, config, stage))
    assert summary["final_loss"] < summary["first_loss"], (stage, summary)
  # The legacy row is the share of sampled slates whose target the legacy ranker put first;
  # the random 1-layer model writes no valid ranking, so every model row reads as the legacy
  # order, exactly.
  slates = slates_lib.load_split(runner.artifact_dir(tiny_workdir, config, "legacy"), "test",
                                 max_examples=config.rl.eval_examples, seed=config.rl.seed)
  legacy = result["rows"]["legacy"]
  assert legacy["R@1"]["mean"] == pytest.approx(float(np.mean(slates["target_index"] == 0)))
  for name in ("sft", "rl", "sft (constrained)", "rl (constrained)"):
    d = result["diagnostics"][name]
    assert d["num_rollouts"] == config.rl.eval_examples
    assert d["num_valid"] == 0 and d["invalid_as_legacy"] == d["num_rollouts"]
    for metric in ("R@1", "R@3", "N@5"):
      assert result["rows"][name][metric]["mean"] == legacy[metric]["mean"], (name, metric)


def test_pipeline_with_numbered_answers_and_frozen_lower_layers(tiny_workdir, tmp_path):
  """The smollm2 preset's recipe on a 2-layer checkpoint: titles and evidence counts in the
  prompt, answers that number the candidates, no explanation, layer 0 and the embedding frozen
  after the warm-up."""
  path = str(tmp_path / "qwen3-2")
  tok = _byte_level_hf(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  cfg = qwen3.ModelConfig(vocab_size=tok.get_vocab_size(with_added_tokens=True),
                          **dict(SHAPE, num_layers=2))
  hf_io.export_hf_checkpoint(qwen3.Qwen3(cfg, rngs=nnx.Rngs(1)), cfg, path)
  tok.save(os.path.join(path, "tokenizer.json"))
  config = config_lib.load_config_module(os.path.join(CONFIGS, "rl.py")).get_config("tiny")
  config.sids.embedding = "collaborative"
  config.midtrain.hf_checkpoint = path
  config.traces.prompt.item_fields = ("sid", "title", "year", "genres", "evidence")
  config.traces.prompt.answer_format = "positions"
  config.traces.prompt.reasoning = False
  for stage in ("midtrain", "sft", "rl"):
    config[stage].frozen_layers = 1
  out, _ = runner.run_stage(config, tiny_workdir, "rl")

  with open(os.path.join(runner.artifact_dir(tiny_workdir, config, "traces"),
                         "traces_targeted.jsonl")) as f:
    user_turn = json.loads(f.readline())["messages"][1]["content"]
  candidates = user_turn.split("Candidates (")[1].splitlines()[1:]
  assert len(candidates) == 10 and all(", followed last " in c for c in candidates)
  assert candidates[0].startswith("1. <|sid_begin|>") and "co-watched" not in user_turn.split(
      "Candidates (")[0]
  params = {stage: nnx.to_pure_dict(nnx.state(artifact.load_model(
      runner.artifact_dir(tiny_workdir, config, stage))))
            for stage in ("midtrain", "sft")}
  params["rl"] = nnx.to_pure_dict(nnx.state(artifact.load_model(out)))
  for a, b in (("midtrain", "sft"), ("sft", "rl")):
    np.testing.assert_array_equal(params[a]["embed_tokens"]["embedding"],
                                  params[b]["embed_tokens"]["embedding"])
    for x, y in zip(jax.tree.leaves(params[a]["layers"][0]), jax.tree.leaves(params[b]["layers"][0])):
      np.testing.assert_array_equal(x, y)
  changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(params[a]["layers"][1]), jax.tree.leaves(params[b]["layers"][1])))
  assert changed("midtrain", "sft")
  summary = runner.read_summary(runner.artifact_dir(tiny_workdir, config, "sft"))
  assert summary["final_loss"] < summary["first_loss"], summary
  with open(os.path.join(out, "table.json")) as f:
    result = json.load(f)
  # Both models re-ranked the same slates with the numbered prompt, free and constrained.
  for name in ("sft", "rl", "sft (constrained)", "rl (constrained)"):
    d = result["diagnostics"][name]
    assert d["num_rollouts"] == config.rl.eval_examples, (name, d)
    assert name in result["rows"]
