"""SID tokenizer stage: item embeddings -> RQ-VAE (or RQ-KMeans) -> semantic IDs.

  python -m gr2_jax.main --config=configs/sids.py --workdir=W
  python -m gr2_jax.main --config=configs/sids.py:tiny --workdir=W
  python -m gr2_jax.main --config=configs/sids.py:ablation --workdir=W   # one row per technique
  python -m gr2_jax.main --config=configs/sids.py --workdir=W --config.sids.embedding=file \
      --config.sids.embedding_path=emb.npy
"""

import ml_collections

from gr2_jax import config_lib

PRESETS = ("default", "tiny", "ablation")


def section(preset):
  c = ml_collections.ConfigDict()
  # Item embeddings: "text" (all-MiniLM-L6-v2 on the item text), "file" (.npy [N, d] in
  # item-id order, or Parquet with columns item (key) and embedding) or "collaborative"
  # (truncated SVD of the training-period co-occurrence PPMI matrix).
  c.embedding = "text"
  c.text_fields = "title,year,genres"  # any items.json fields, e.g. add description
  c.text_template = ""  # str.format over item fields, e.g. "{title} ({year}): {genres}"
  c.encoder_batch_size = 64
  c.encoder_max_length = 256
  c.embedding_path = ""
  c.collaborative_dim = 64
  c.co_window = 5  # items within this many steps of each other co-occur (training periods)
  c.standardize = True  # zero-mean, unit-variance embedding dims before tokenizing

  c.tokenizer = "rqvae"  # or "rq_kmeans" (training-free residual k-means baseline)
  c.num_levels = 3  # learned levels; one more (random or learned) disambiguates
  c.codebook_size = 256
  c.random_last_level = True  # False: the disambiguation level is learned like the others
  # RQ-VAE.
  c.hidden_dims = (256, 128)
  c.latent_dim = 32
  c.beta = 0.25
  c.ema = True
  c.ema_decay = 0.99
  c.kmeans_init = "all"  # none | batch (first batch) | all (whole catalogue)
  c.kmeans_iters = 20
  c.kmeans_seeding = "kmeans++"  # or random (RQ-KMeans baseline)
  c.diversity_weight = 0.0
  c.diversity_mode = "soft"
  c.dead_code_reset = True  # keeps every level-1 code in use (without it ~half die early)
  c.dead_code_steps = 100
  c.contrastive_weight = 0.0
  c.contrastive_temperature = 0.1
  c.learning_rate = 1e-3
  c.batch_size = 256
  c.steps = 3000
  c.chunk = 100
  c.save_every = 1000
  c.seed = 0
  # Ablation: one row per technique, added in this order to a plain RQ-VAE, plus RQ-KMeans
  # (plain_no_kmeans: the plain row with randomly initialised codebooks).
  c.ablation = False
  c.ablation_rows = ("plain_no_kmeans,plain,ema,random_last,diversity,dead_code,contrastive,"
                     "rq_kmeans")
  if preset == "tiny":
    c.codebook_size = 64
    c.hidden_dims = (128,)
    c.latent_dim = 16
    c.steps = 400
    c.save_every = 200
  elif preset == "ablation":
    c.ablation = True
    c.diversity_weight = 0.1
    c.contrastive_weight = 0.1
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
