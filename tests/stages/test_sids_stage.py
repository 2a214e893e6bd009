"""End-to-end tests of the sids stage on a small fixture data artifact."""

import json
import os

import ml_collections
import numpy as np
import pytest

from gr2_jax import runner
from gr2_jax.data import artifacts
from gr2_jax.errors import UserError
from gr2_jax.sids import tokens
from gr2_jax.stages import sids as sids_stage

N = 40  # as in test_rqvae.py: same shapes, same compiled step


def _load_section(**overrides):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sids.py")
  spec = importlib.util.spec_from_file_location("sids_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  s = module.section("tiny")
  # Small and cheap, and the same RQ-VAE as tests/sids/test_rqvae.py's resumption test, so
  # one compiled train step serves all of them.
  s.update(embedding="file", codebook_size=4, num_levels=2, hidden_dims=(8,), latent_dim=4,
           batch_size=16, steps=20, chunk=10, save_every=10, kmeans_iters=5,
           dead_code_reset=True, dead_code_steps=3, diversity_weight=0.1,
           contrastive_weight=0.1)
  s.update(**overrides)
  return s


def _write_data(folder, n=N, emb_width=6, seed=0):
  os.makedirs(folder, exist_ok=True)
  items = [{"id": i, "key": f"Movie {i} (1990)", "title": f"Movie {i}", "year": 1990,
            "genres": ["Drama"], "description": ""} for i in range(n)]
  artifacts.save_items(folder, items)
  rng = np.random.default_rng(seed)
  users = np.repeat(np.arange(10), 8)
  artifacts.save_interactions(folder, {
      "user": users.astype(np.int32), "item": rng.integers(0, n, users.size).astype(np.int32),
      "rating": np.ones(users.size, np.float32),
      "timestamp": np.tile(np.arange(8), 10).astype(np.int64),
      "period": np.tile([0, 0, 1, 1, 1, 1, 2, 3], 10).astype(np.int8)})
  path = os.path.join(folder, "emb.npy")
  np.save(path, rng.normal(size=(n, emb_width)).astype(np.float32))
  return items, path


def _ctx(tmp_path, section):
  config = ml_collections.ConfigDict({"sids": section})
  out = tmp_path / "out"
  out.mkdir(exist_ok=True)
  return runner.StageContext(name="sids", config=config, section=section,
                             workdir=str(tmp_path), out_dir=str(out),
                             inputs={"data": str(tmp_path / "data")})


def test_stage_writes_unique_sids_and_report(tmp_path):
  items, emb_path = _write_data(str(tmp_path / "data"))
  ctx = _ctx(tmp_path, _load_section(embedding_path=emb_path))
  summary = sids_stage.run(ctx)
  table = tokens.load_sid_table(ctx.path())
  assert table["num_learned"] == 2 and table["codebook_size"] == 4
  assert len(table["items"]) == N
  sids = [row["sid"] for row in table["items"]]
  assert len(set(sids)) == N  # the random last level makes every SID unique
  for row, item in zip(table["items"], items):
    assert row["id"] == item["id"] and tokens.parse_sid(row["sid"]) == tuple(row["codes"])
    assert max(row["codes"]) < 4
  with open(ctx.path("report.json")) as f:
    rep = json.load(f)
  assert rep["uniqueness_full"] == summary["uniqueness_full"] == 1.0
  assert rep["items"] == N and len(rep["levels_stats"]) == table["num_levels"]
  assert np.load(ctx.path("item_embeddings.npy")).shape == (N, 6)
  assert os.path.isdir(ctx.path("ckpt", "main"))
  # Same seed, same codes: a second run resumes from the final checkpoint.
  sids_stage.run(ctx)
  assert [r["sid"] for r in tokens.load_sid_table(ctx.path())["items"]] == sids


def test_stage_ablation_rows(tmp_path):
  _, emb_path = _write_data(str(tmp_path / "data"))
  section = _load_section(embedding_path=emb_path, ablation=True,
                          ablation_rows="contrastive,rq_kmeans")
  ctx = _ctx(tmp_path, section)
  sids_stage.run(ctx)
  with open(ctx.path("ablation.json")) as f:
    rows = json.load(f)
  assert list(rows) == ["contrastive", "rq_kmeans"]
  assert rows["rq_kmeans"]["uniqueness_full"] == 1.0
  with open(ctx.path("ablation.md")) as f:
    md = f.read().splitlines()
  assert md[2].startswith("| contrastive |") and md[3].startswith("| rq_kmeans |")
  # The section's own configuration equals the last RQ-VAE row, so its report is reused.
  with open(ctx.path("report.json")) as f:
    assert json.load(f)["uniqueness_learned"] == rows["contrastive"]["uniqueness_learned"]


def test_stage_rq_kmeans_tokenizer(tmp_path):
  _, emb_path = _write_data(str(tmp_path / "data"))
  ctx = _ctx(tmp_path, _load_section(embedding_path=emb_path, tokenizer="rq_kmeans"))
  assert sids_stage.run(ctx)["uniqueness_full"] == 1.0


@pytest.mark.parametrize("case, match", [
    ("duplicate", "item id 3 twice"),
    ("small", "smaller than the codebook size 4"),
    ("nan", "NaN"),
    ("width", "shape"),
    ("empty_text", "empty text"),
])
def test_stage_bad_inputs(tmp_path, case, match):
  folder = str(tmp_path / "data")
  items, emb_path = _write_data(folder, n=3 if case == "small" else N)
  section = _load_section(embedding_path=emb_path)
  if case == "duplicate":
    items[4]["id"] = 3
    artifacts.save_items(folder, items)
  elif case == "nan":
    emb = np.load(emb_path)
    emb[5, 2] = np.nan
    np.save(emb_path, emb)
  elif case == "width":
    np.save(emb_path, np.zeros((N - 1, 6), np.float32))
  elif case == "empty_text":
    items[7].update(title="", year=None, genres=[])
    artifacts.save_items(folder, items)
    section.embedding = "text"
  with pytest.raises(UserError, match=match):
    sids_stage.run(_ctx(tmp_path, section))
