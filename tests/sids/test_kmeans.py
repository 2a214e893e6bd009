"""Tests of k-means and RQ-KMeans."""

import jax
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.sids import kmeans


def _blobs(seed=0, per=20):
  rng = np.random.default_rng(seed)
  centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)
  x = np.concatenate([c + 0.1 * rng.normal(size=(per, 2)) for c in centres])
  return x.astype(np.float32), np.repeat(np.arange(4), per)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_recovers_separated_blobs(init):
  x, truth = _blobs()
  centres, assign = kmeans.kmeans(jax.random.PRNGKey(0), x, 4, 10, init)
  assign = np.asarray(assign)
  if init == "kmeans++":  # D^2 seeding cannot miss a blob this far apart
    # Each found cluster is exactly one true blob.
    assert len({(t, a) for t, a in zip(truth, assign)}) == 4
    expected = np.stack([x[assign == k].mean(0) for k in range(4)])
    np.testing.assert_allclose(np.asarray(centres), expected, atol=1e-4)
  assert np.asarray(centres).shape == (4, 2) and assign.max() < 4


def test_residual_kmeans_codes_and_reconstruction():
  x, _ = _blobs()
  books, codes, recon = kmeans.residual_kmeans(jax.random.PRNGKey(1), x, 2, 4, 10)
  assert books.shape == (2, 4, 2) and codes.shape == (80, 2)
  expected = np.asarray(books)[0][codes[:, 0]] + np.asarray(books)[1][codes[:, 1]]
  np.testing.assert_allclose(np.asarray(recon), expected, atol=1e-5)
  # Two levels reconstruct better than the first level alone.
  err1 = ((x - np.asarray(books)[0][codes[:, 0]]) ** 2).sum()
  assert ((x - np.asarray(recon)) ** 2).sum() < err1


def test_residual_kmeans_small_catalogue_is_user_error():
  with pytest.raises(UserError, match="smaller than the codebook"):
    kmeans.residual_kmeans(jax.random.PRNGKey(0), np.zeros((3, 2)), 1, 4)
