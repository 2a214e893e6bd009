"""Tests of the RQ-VAE: quantiser, EMA, dead-code reset, losses, training and resumption."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.sids import rqvae

TINY = rqvae.RQVAEConfig(input_dim=6, hidden_dims=(8,), latent_dim=4, num_levels=2,
                         codebook_size=4, batch_size=16, steps=20, chunk=10, kmeans_iters=5)


def _np_quantize(z, books):
  residual, codes, total = z.copy(), [], np.zeros_like(z)
  for book in books:
    d = ((residual[:, None, :] - book[None]) ** 2).sum(-1)
    idx = d.argmin(-1)
    codes.append(idx)
    total += book[idx]
    residual = residual - book[idx]
  return np.stack(codes, 1), total


def test_quantize_matches_numpy_residual_quantisation():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(7, 3)).astype(np.float32)
  books = rng.normal(size=(3, 5, 3)).astype(np.float32)
  out = rqvae.quantize(jnp.asarray(z), jnp.asarray(books))
  codes, total = _np_quantize(z, books)
  np.testing.assert_array_equal(np.asarray(out["codes"]), codes)
  np.testing.assert_allclose(np.asarray(out["q"].sum(0)), total, atol=1e-5)


def test_ema_update_by_hand():
  cfg = dataclasses.replace(TINY, num_levels=1, random_last_level=True, codebook_size=2,
                            latent_dim=1, ema_decay=0.5, ema_eps=0.0)
  tok = rqvae.Tokenizer(cfg)
  state = rqvae.TrainState(params={}, codebooks=jnp.array([[[0.0], [5.0]]]),
                           ema_count=jnp.array([[1.0, 1.0]]), ema_sum=jnp.array([[[0.0], [5.0]]]),
                           unused=jnp.zeros((1, 2), jnp.int32), opt_state=None, step=0)
  qz = {"codes": jnp.array([[0], [0], [1]]), "residuals": jnp.array([[[1.0], [3.0], [7.0]]])}
  books, count, total = tok.ema_update(state, state.codebooks, qz)
  # count = 0.5 * 1 + 0.5 * [2, 1]; sum = 0.5 * [0, 5] + 0.5 * [4, 7].
  np.testing.assert_allclose(np.asarray(count), [[1.5, 1.0]])
  np.testing.assert_allclose(np.asarray(total), [[[2.0], [6.0]]])
  np.testing.assert_allclose(np.asarray(books), [[[2.0 / 1.5], [6.0]]], rtol=1e-6)


def test_reset_dead_codes_uses_worst_items():
  cfg = dataclasses.replace(TINY, num_levels=1, codebook_size=3, latent_dim=1,
                            dead_code_steps=2)
  tok = rqvae.Tokenizer(cfg)
  books = jnp.array([[[0.0], [1.0], [2.0]], [[0.0], [1.0], [2.0]]])
  unused = jnp.array([[0, 2, 5], [0, 0, 1]])
  residuals = jnp.array([[[10.0], [20.0], [30.0]], [[0.0], [0.0], [0.0]]])  # [Lq, B, dz]
  per_item = jnp.array([0.1, 0.9, 0.5])  # worst first: items 1, 2, 0
  new, count, total, left = tok.reset_dead_codes(
      books, jnp.ones((2, 3)), books, unused, {"residuals": residuals}, per_item,
      jax.random.PRNGKey(0))
  np.testing.assert_allclose(np.asarray(new[0, :, 0]), [0.0, 20.0, 30.0], atol=0.1)
  np.testing.assert_array_equal(np.asarray(new[1]), np.asarray(books[1]))
  np.testing.assert_array_equal(np.asarray(left), [[0, 0, 0], [0, 0, 1]])
  np.testing.assert_allclose(np.asarray(total[0, 1:, 0]), np.asarray(new[0, 1:, 0]))


def test_diversity_loss_values():
  # Equal distances: uniform usage -> 1. One code always closest by far -> C.
  assert float(rqvae.diversity_loss(jnp.zeros((1, 4, 4)))) == pytest.approx(1.0)
  far = jnp.tile(jnp.array([0.0, 100.0, 100.0, 100.0]), (1, 4, 1))
  assert float(rqvae.diversity_loss(far)) == pytest.approx(4.0, rel=1e-4)
  assert float(rqvae.diversity_loss(far, "hard")) == pytest.approx(4.0)


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(1)
  za, zp = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  mask = np.array([True, True, False, True])
  a = za / np.linalg.norm(za, axis=1, keepdims=True)
  p = zp / np.linalg.norm(zp, axis=1, keepdims=True)
  logits = a @ p.T / 0.5
  nll = -(np.diag(logits) - np.log(np.exp(logits).sum(1)))
  got = rqvae.info_nce(jnp.asarray(za), jnp.asarray(zp), jnp.asarray(mask), 0.5)
  assert float(got) == pytest.approx(nll[mask].mean(), rel=1e-5)


def test_positive_sampler_only_returns_partners():
  sampler = rqvae.PositiveSampler(np.array([0, 0, 2]), np.array([1, 3, 0]), num_items=4)
  pos, has = sampler.sample(np.random.default_rng(0), np.array([0, 1, 2, 0, 0, 0]))
  np.testing.assert_array_equal(has, [True, False, True, True, True, True])
  assert set(pos[[0, 3, 4, 5]]) <= {1, 3} and pos[2] == 0


def _data(n=40):
  rng = np.random.default_rng(0)
  return rng.normal(size=(n, 6)).astype(np.float32)


def test_training_is_deterministic_and_resumes_exactly(tmp_path):
  x = _data()
  cfg = dataclasses.replace(TINY, dead_code_reset=True, dead_code_steps=3,
                            diversity_weight=0.1, contrastive_weight=0.1)
  pairs = (np.arange(40) % 40, (np.arange(40) + 1) % 40)
  tok, straight = rqvae.train(cfg, x, pairs, log=False)
  codes, recon = tok.encode(straight, jnp.asarray(x))
  assert codes.shape == (40, 2) and recon.shape == (40, 6)
  half = dataclasses.replace(cfg, steps=10)
  rqvae.train(half, x, pairs, str(tmp_path / "ckpt"), save_every=10, log=False)
  tok2, resumed = rqvae.train(cfg, x, pairs, str(tmp_path / "ckpt"), save_every=10,
                              log=False)
  assert int(resumed.step) == 20
  np.testing.assert_array_equal(np.asarray(tok2.encode(resumed, jnp.asarray(x))[0]),
                                np.asarray(codes))
  np.testing.assert_allclose(np.asarray(resumed.codebooks), np.asarray(straight.codebooks),
                             atol=1e-6)


def test_codebook_loss_training_moves_codebooks():
  cfg = dataclasses.replace(TINY, ema=False, random_last_level=False, kmeans_init="none",
                            diversity_mode="hard", diversity_weight=0.1)
  tok = rqvae.Tokenizer(cfg)
  before = tok.init(jax.random.PRNGKey(cfg.seed))
  _, after = rqvae.train(cfg, _data(), log=False)
  assert after.codebooks.shape == (3, 4, 4)  # one more learned level without random last
  assert float(jnp.abs(after.codebooks - before.codebooks).max()) > 1e-3


def test_bad_inputs_are_user_errors():
  with pytest.raises(UserError, match="smaller than the codebook"):
    rqvae.train(TINY, _data(3), log=False)
  with pytest.raises(UserError, match="width 5"):
    rqvae.train(TINY, _data()[:, :5], log=False)
  with pytest.raises(UserError, match="kmeans_init"):
    rqvae.validate(dataclasses.replace(TINY, kmeans_init="bogus"), 40)
  with pytest.raises(UserError, match="co-engaged"):
    rqvae.train(dataclasses.replace(TINY, contrastive_weight=0.1), _data(), None, log=False)
