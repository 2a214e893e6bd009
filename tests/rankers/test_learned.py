"""LambdaMART and PRM: each learns a planted relevance rule; the PRM loss is the listwise
softmax cross-entropy computed by hand; the PRM trainer resumes exactly; score lookups."""

import json

from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.eval import metrics
from gr2_jax.eval import tables
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.rankers import features as features_lib
from gr2_jax.rankers import lambdamart
from gr2_jax.rankers import prm
from gr2_jax.rankers import scores as scores_lib
from gr2_jax.train import optim
from gr2_jax.train import trainer as trainer_lib

F = len(features_lib.NAMES)
SIGNAL = features_lib.NAMES.index("cooc")


def planted(n, k=6, seed=0):
  """Features with noise; the positive of each slate is the candidate with the largest `cooc`
  feature; a slate dict with that target."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, k, F)).astype(np.float32)
  x[..., features_lib.NAMES.index("user_gender")] = rng.integers(0, 2, (n, 1))
  x[..., features_lib.NAMES.index("user_occupation")] = rng.integers(0, 5, (n, 1))
  t = x[..., SIGNAL].argmax(1)
  y = np.zeros((n, k), np.float32)
  y[np.arange(n), t] = 1
  slates = {"slate": rng.integers(0, 30, (n, k)), "history": rng.integers(-1, 30, (n, 4)),
            "target_index": t.astype(np.int32), "labels": y.astype(np.int8),
            "grades": y.astype(np.int8), "example_id": np.arange(n)}
  return x, y, slates


def lgb_config(**kw):
  c = ml_collections.ConfigDict(dict(
      num_boost_round=60, early_stopping=20, learning_rate=0.1, num_leaves=15,
      min_data_in_leaf=5, feature_fraction=1.0, truncation_level=6, num_threads=1, log_every=0))
  c.update(kw)
  return c


def test_lambdamart_learns_the_planted_feature_and_reloads(tmp_path):
  x, y, _ = planted(600)
  xv, yv, sv = planted(300, seed=1)
  booster, info = lambdamart.train(x, y, xv, yv, lgb_config(), 0, str(tmp_path))
  s = lambdamart.predict(booster, xv)
  r1 = np.mean(s.argmax(1) == sv["target_index"])
  assert r1 > 0.9, r1  # chance is 1/6
  assert info["best_iteration"] >= 1 and 0 < info["validation"]["ndcg@1"] <= 1
  top = lambdamart.importances(booster, top=3)
  assert top[0][0] == "cooc" and top[0][1] > 0.5
  again, info2 = lambdamart.train(x, y, xv, yv, lgb_config(), 0, str(tmp_path))
  assert "loaded" in info2
  np.testing.assert_allclose(lambdamart.predict(again, xv), s, rtol=1e-6)


def test_lambdamart_refuses_labels_without_positive(tmp_path):
  x, y, _ = planted(20)
  with pytest.raises(UserError, match="no positive"):
    lambdamart.train(x, 0 * y, x, y, lgb_config(), 0, str(tmp_path))


def _prm_setup(n=256, seed=0):
  x, y, s = planted(n, seed=seed)
  table = np.random.default_rng(5).normal(size=(30, 8)).astype(np.float32)
  cfg = prm.PRMConfig(num_features=F, embed_dim=8, slate_size=6, dim=16, num_heads=2,
                      mlp_dim=32, history=4)
  std = prm.Standardizer(x)
  return cfg, table, prm.rows(std(x), s, y, cfg.history), s


def test_prm_loss_is_the_listwise_softmax_cross_entropy_by_hand():
  cfg, table, rows, _ = _prm_setup(8)
  rows["labels"][1] = 0  # no positive: weight 0
  rows["labels"][2, :2] = 1  # two positives: the label mass splits
  rows["weight"] = (rows["labels"] > 0).any(1).astype(np.float32)
  model = prm.PRM(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  obj = prm.objective(table, cfg)
  batch = {k: rows[k] for k in prm.FIELDS}
  total, weight = obj.loss(graphdef, nnx.to_pure_dict(state), batch)
  s = np.asarray(prm.scores(model, table, batch), np.float64)
  logp = s - np.log(np.exp(s).sum(1, keepdims=True))
  lab = rows["labels"].astype(np.float64)
  per = -(lab * logp).sum(1)  # each positive's cross-entropy (rax.softmax_loss)
  assert float(weight) == 7
  np.testing.assert_allclose(float(total), (per * rows["weight"]).sum(), rtol=1e-5)


def _trainer(tmp_path, cfg, table, steps):
  model = prm.PRM(cfg, rngs=nnx.Rngs(0))
  ocfg = optim.OptimConfig(learning_rate=3e-3, warmup_steps=2, total_steps=steps)
  tcfg = trainer_lib.TrainerConfig(num_steps=steps, log_every=5, checkpoint_every=5,
                                   peak_flops=1e9)
  return trainer_lib.Trainer(model, ocfg, tcfg, mesh=mesh_lib.data_parallel_mesh(),
                             workdir=str(tmp_path), name="prm",
                             objective=prm.objective(table, cfg))


def test_prm_learns_the_planted_feature_through_the_trainer(tmp_path):
  cfg, table, rows, _ = _prm_setup(512)
  tr = _trainer(tmp_path, cfg, table, 100)
  params, summary = tr.fit(trainer_lib.batch_dataset(rows, 32))
  hist = summary["loss_history"]
  assert hist[-1]["loss"] < 0.6 * hist[0]["loss"]
  assert summary["slates_per_sec"] > 0 and summary["mfu"] > 0
  _, _, val_rows, sv = _prm_setup(256, seed=1)
  # The validation rows are standardised with their own statistics: same distribution.
  s = prm.predict(tr.model(params), table, val_rows, batch_size=100)
  assert np.mean(s.argmax(1) == sv["target_index"]) > 0.5  # chance 1/6


def test_prm_trainer_resumes_exactly(tmp_path):
  cfg, table, rows, _ = _prm_setup(128)
  ds = trainer_lib.batch_dataset(rows, 16)
  straight, _ = _trainer(tmp_path / "a", cfg, table, 10).fit(ds)

  class Stop(Exception):
    pass

  def stop_at_5(step):
    if step == 6:
      raise Stop()

  with pytest.raises(Stop):
    _trainer(tmp_path / "b", cfg, table, 10).fit(ds, on_step=stop_at_5)
  resumed, summary = _trainer(tmp_path / "b", cfg, table, 10).fit(ds)
  assert summary["resumed_from"] == 5
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_standardizer_fills_missing_and_constant_features():
  x = np.random.default_rng(0).normal(size=(10, 3, F)).astype(np.float32)
  x[..., 0] = 4.0
  x[:5, :, 1] = np.nan
  std = prm.Standardizer(x)
  z = std(x)
  assert np.isfinite(z).all() and (z[..., 0] == 0).all() and (z[:5, :, 1] == 0).all()
  back = prm.Standardizer.from_dict(json.loads(json.dumps(std.to_dict())))
  np.testing.assert_array_equal(back(x), z)


def test_scores_lookup_by_example_id_and_best_vs_best(tmp_path):
  _, _, s = planted(50)
  rng = np.random.default_rng(3)
  good = np.where(np.arange(6) == s["target_index"][:, None], 1.0, 0.0) + rng.random((50, 6))
  scores_lib.save(str(tmp_path), "test", s["example_id"], {"cf": good, "prm": rng.random((50, 6))})
  assert scores_lib.names(str(tmp_path), "test") == ["cf", "prm"]
  assert scores_lib.names(str(tmp_path), "train") == []
  sub = {k: v[10:20] for k, v in s.items()}
  o = scores_lib.orders(str(tmp_path), "test", sub)
  np.testing.assert_array_equal(o["cf"], tables.order_by_scores(good[10:20]))
  with pytest.raises(UserError, match="not in"):
    scores_lib.orders(str(tmp_path), "test", sub, ["lambdamart"])
  with pytest.raises(UserError, match="no scores"):
    scores_lib.orders(str(tmp_path), "test", {"example_id": np.array([3, 99])})
  orders = scores_lib.orders(str(tmp_path), "test", s)
  orders["llm_a"] = tables.random_orders(50, 6, 0)
  orders["llm_b"] = orders["cf"][:, ::-1].copy()
  best = scores_lib.best_vs_best(orders, s, ["llm_a", "llm_b"], ["cf", "prm"], n_boot=100)
  r1 = {k: tables.per_example(v, s)["R@1"] for k, v in orders.items()}
  exp_llm = max(["llm_a", "llm_b"], key=lambda k: r1[k].mean())
  assert best["llm"] == exp_llm and best["baseline"] == "cf"
  ref = metrics.paired_bootstrap(r1[exp_llm], r1["cf"], n_boot=100)
  assert best["diff"] == ref["diff"] and best["diff_hi"] == ref["diff_hi"]
  assert scores_lib.best_vs_best(orders, s, [], ["cf"]) is None
