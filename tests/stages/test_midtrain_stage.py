"""Tiny mid-training end to end: warm-up, training, artifact, evaluation table, bad input."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.errors import UserError
from gr2_jax.midtrain import tasks as tasks_lib
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.sids import tokens as sid_lib
from gr2_jax.stages import midtrain
from gr2_jax.models import artifact

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def _config(**overrides):
  config = config_lib.load_config_module(os.path.join(CONFIGS, "midtrain.py")).get_config("tiny")
  config.sids.embedding = "collaborative"  # the text encoder is not what this test is about
  for k, v in overrides.items():
    config.midtrain[k] = v
  return config


def _restore(path):
  return ocp.StandardCheckpointer().restore(path)


def test_tiny_midtrain_end_to_end(tiny_workdir):
  config = _config()
  out, summary = runner.run_stage(config, tiny_workdir, "midtrain")
  c = config.midtrain
  tok_dir = os.path.join(out, "tokenizer")
  model, tok = artifact.load_model_and_tokenizer(out)
  table = sid_lib.load_sid_table(runner.artifact_dir(tiny_workdir, config, "sids"))
  sid_ids = [tok.token_to_id(t) for t in sid_lib.all_sid_tokens(table["num_levels"],
                                                                 table["codebook_size"])]
  assert os.path.isdir(tok_dir) and None not in sid_ids

  # The warm-up moved the SID rows of the embedding and nothing else.
  fresh = mesh_lib.create_sharded_model(model.cfg, mesh_lib.single_device_mesh(), seed=c.seed)
  init = nnx.to_pure_dict(nnx.state(fresh))
  warm = _restore(os.path.join(out, "warmup", "ckpt", str(c.warmup_steps), "state"))["params"]
  emb0 = np.asarray(init["embed_tokens"]["embedding"])
  emb1 = np.asarray(warm["embed_tokens"]["embedding"])
  others = np.setdiff1d(np.arange(emb0.shape[0]), sid_ids)
  np.testing.assert_array_equal(emb1[others], emb0[others])
  assert (np.abs(emb1[sid_ids] - emb0[sid_ids]).max(axis=1) > 0).mean() > 0.5
  np.testing.assert_array_equal(warm["layers"]["0"]["mlp"]["up_proj"]["kernel"],
                                init["layers"][0]["mlp"]["up_proj"]["kernel"])

  # The saved model is the last training checkpoint.
  last = _restore(os.path.join(out, "train", "ckpt", str(c.steps), "state"))["params"]
  np.testing.assert_array_equal(nnx.to_pure_dict(nnx.state(model))["norm"]["weight"],
                                last["norm"]["weight"])

  with open(os.path.join(out, "eval.json")) as f:
    report = json.load(f)
  for split in ("validation", "test"):
    rows = report["retrieval"][split]
    assert set(rows) == {"popularity", "sasrec (legacy)", "llm (constrained beam)"}
    for m in rows.values():
      assert m["R@10"]["n"] == c.eval_examples
      assert m["R@5"]["mean"] <= m["R@10"]["mean"] and m["N@5"]["mean"] <= m["N@10"]["mean"]
  assert report["caption_accuracy"]["n"] == c.caption_items
  sa = report["slate_answers"]
  assert 0 < sa["n"] <= c.eval_examples and sum(sa["reasons"].values()) == sa["n"]
  assert sa["valid_rate"] == sa["reasons"].get("ok", 0) / sa["n"]
  # Tokens per task: every task with a share was trained, in about its share.
  tt = summary["task_tokens"]
  total = sum(tt.values())
  assert total > 0.5 * c.steps * c.batch_size * c.micro_batches * c.seq_len
  assert tt["sequential"] > tt["persona"] > 0 and tt["caption"] > 0 and tt["text"] > 0
  assert tt["slates"] > tt["sequential"]
  assert os.path.isfile(os.path.join(out, "train", "tb", "metrics.jsonl"))
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(
      os.path.join(out, "train", "tb")))


@pytest.mark.parametrize("overrides,message", [
    ({"task_mix": {"sequential": 0.0, "caption": 0.0, "persona": 0.0, "text": 0.0,
                   "slates": 0.0}},
     "sums to zero"),
    ({"seq_len": 16}, "but seq_len is 16"),
    ({"caption_steps": -1}, "caption_steps=-1 must be >= 0"),
    ({"caption_rehearsal": 1.0}, r"caption_rehearsal=1.0 must be in \[0, 1\)"),
])
def test_bad_input_is_one_clear_error(tiny_workdir, overrides, message):
  config = _config(**overrides)
  with pytest.raises(UserError, match=message):
    runner.run_stage(config, tiny_workdir, "midtrain")


def test_caption_phase_trains_titles_with_rehearsal(tiny_workdir):
  config = _config(caption_steps=3, caption_rehearsal=0.5)
  out, _ = runner.run_stage(config, tiny_workdir, "midtrain")
  c = config.midtrain
  with open(os.path.join(out, "eval.json")) as f:
    training = json.load(f)["training"]
  assert set(training) == {"warmup", "train", "caption"}
  assert training["caption"]["steps"] == c.caption_steps
  tokens = training["caption"]["task_tokens"]
  # Title rows carry caption tokens only; the rehearsal rows bring the other tasks back.
  assert tokens["caption"] > 0
  assert sum(v for k, v in tokens.items() if k != "caption") > 0, tokens
  # The saved model is the caption phase's last checkpoint.
  model, _ = artifact.load_model_and_tokenizer(out)
  last = _restore(os.path.join(out, "caption", "ckpt", str(c.caption_steps), "state"))["params"]
  np.testing.assert_array_equal(nnx.to_pure_dict(nnx.state(model))["norm"]["weight"],
                                last["norm"]["weight"])


def test_caption_phase_rows_mix_titles_and_rehearsal():
  titles = {"tokens": np.array([[1, 2], [3, 4]]), "task": np.array([[1, 1], [1, 1]])}
  mix = {"tokens": np.arange(12).reshape(6, 2) + 10, "task": np.zeros((6, 2), np.int64)}
  # Half rehearsal: 6 mix rows need 6 title rows, i.e. 3 copies of the 2 title rows.
  rows, copies = midtrain.caption_phase_rows(titles, mix, 0.5)
  assert copies == 3
  np.testing.assert_array_equal(rows["tokens"], [[1, 2], [3, 4]] * 3 + mix["tokens"].tolist())
  np.testing.assert_array_equal(rows["task"][:6], 1)
  np.testing.assert_array_equal(rows["task"][6:], 0)
  # A quarter: 6 mix rows / 0.25 * 0.75 = 18 title rows = 9 copies.
  rows, copies = midtrain.caption_phase_rows(titles, mix, 0.25)
  assert copies == 9 and len(rows["tokens"]) == 24
  # None: the title rows alone.
  rows, copies = midtrain.caption_phase_rows(titles, mix, 0.0)
  assert copies == 1
  np.testing.assert_array_equal(rows["tokens"], titles["tokens"])


def test_title_docs():
  items = [{"title": "Toy Story", "year": 1995}, {"title": "Heat", "year": 1995}]
  assert tasks_lib.title_docs(items, ["<a_1><b_2>", "<a_3><b_4>"], [1]) == [
      "<a_3><b_4> title: Heat"]
