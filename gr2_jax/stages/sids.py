"""SID stage: item embeddings -> RQ-VAE / RQ-KMeans codes -> sid_table.json and report.json.

Artifact: `sid_table.json` (see gr2_jax/sids/tokens.py), `report.json`, `report.txt`,
`item_embeddings.npy` [N, d] (the tokenizer's input, item-id order), `ckpt/` (RQ-VAE orbax
checkpoints; a crashed run resumes from them) and, for the ablation preset, `ablation.json`
and `ablation.md`.
"""

import dataclasses
import json
import time

from absl import logging
import jax
import numpy as np

from gr2_jax.data import artifacts
from gr2_jax.errors import UserError
from gr2_jax.sids import codes as codes_lib
from gr2_jax.sids import embeddings as emb_lib
from gr2_jax.sids import kmeans as kmeans_lib
from gr2_jax.sids import report as report_lib
from gr2_jax.sids import rqvae
from gr2_jax.sids import tokens

# Ablation rows in the papers' order; each row adds its technique to the ones above it.
# "plain_no_kmeans" is the plain row with random instead of k-means codebook initialisation.
ABLATION_ORDER = ("plain", "ema", "random_last", "diversity", "dead_code", "contrastive")
ROWS = ("plain_no_kmeans",) + ABLATION_ORDER + ("rq_kmeans",)


def check_items(items):
  """Ids must be 0..N-1, each once."""
  if not items:
    raise UserError("items.json holds no items; rerun the data stage")
  ids = [it.get("id") for it in items]
  seen = set()
  for i in ids:
    if i in seen:
      raise UserError(f"items.json has item id {i} twice; ids must be unique")
    seen.add(i)
  if sorted(ids) != list(range(len(items))):
    raise UserError(f"items.json ids must be 0..{len(items) - 1}; rerun the data stage")
  return sorted(items, key=lambda it: it["id"])


def rqvae_config(section, input_dim, **overrides):
  fields = {f.name for f in dataclasses.fields(rqvae.RQVAEConfig)}
  values = {k: section[k] for k in fields if k in section}
  values["hidden_dims"] = tuple(values.get("hidden_dims", ()))
  values.update(input_dim=input_dim, **overrides)
  return rqvae.RQVAEConfig(**values)


def ablation_overrides(row, section):
  """RQ-VAE overrides of one ablation row: techniques up to `row` on, later ones off."""
  if row == "plain_no_kmeans":
    return dict(ablation_overrides("plain", section), kmeans_init="none")
  on = ABLATION_ORDER[:ABLATION_ORDER.index(row) + 1]
  return {"ema": "ema" in on, "random_last_level": "random_last" in on,
          "diversity_weight": section.diversity_weight if "diversity" in on else 0.0,
          "dead_code_reset": "dead_code" in on and section.dead_code_reset,
          "contrastive_weight": section.contrastive_weight if "contrastive" in on else 0.0}


def item_embeddings(section, items, data_dir):
  kind = section.embedding
  if kind == "text":
    fields = tuple(f.strip() for f in section.text_fields.split(",") if f.strip())
    emb = emb_lib.text_embeddings(items, fields, section.text_template,
                                  section.encoder_batch_size, section.encoder_max_length)
  elif kind == "file":
    emb = emb_lib.load_user_embeddings(section.embedding_path, items)
  elif kind == "collaborative":
    inter = artifacts.load_interactions(data_dir)
    emb = emb_lib.collaborative_embeddings(inter, len(items), section.collaborative_dim,
                                           section.co_window)
  else:
    raise UserError(f"sids embedding={kind!r}; valid: text, file, collaborative")
  return emb_lib.check_embeddings(emb, len(items), kind)


def tokenize(cfg, kind, x, pairs, ckpt_dir, save_every):
  """Codes [N, L_all] (disambiguation appended) and the reconstruction of x."""
  if kind == "rq_kmeans":
    _, codes, x_hat = kmeans_lib.residual_kmeans(
        jax.random.PRNGKey(cfg.seed), x, cfg.quantized_levels, cfg.codebook_size,
        cfg.kmeans_iters, cfg.kmeans_seeding)
  elif kind == "rqvae":
    tok, state = rqvae.train(cfg, x, pairs, ckpt_dir, save_every)
    codes, x_hat = tok.encode(state, jax.numpy.asarray(x))
  else:
    raise UserError(f"sids tokenizer={kind!r}; valid: rqvae, rq_kmeans")
  codes = np.asarray(codes)
  if cfg.random_last_level:
    codes = codes_lib.random_last_level(codes, cfg.codebook_size, cfg.seed)
  return codes, np.asarray(x_hat)


def run(ctx):
  s = ctx.section
  start = time.time()
  data_dir = ctx.input_path("data")
  items = check_items(artifacts.load_items(data_dir))
  if len(items) < s.codebook_size:
    raise UserError(f"catalogue of {len(items)} items is smaller than the codebook size "
                    f"{s.codebook_size}; lower --config.sids.codebook_size")
  emb = item_embeddings(s, items, data_dir)
  np.save(ctx.path("item_embeddings.npy"), emb)
  t_embed = time.time() - start
  mean, std = emb.mean(0), emb.std(0) + 1e-8
  x = (emb - mean) / std if s.standardize else emb
  to_emb = (lambda y: y * std + mean) if s.standardize else (lambda y: y)

  needs_pairs = s.contrastive_weight > 0
  pairs = None
  if needs_pairs:
    pairs = emb_lib.co_occurrence_pairs(artifacts.load_interactions(data_dir), len(items),
                                        s.co_window)
    logging.info("[sids] %d co-engaged pairs (window %d, training periods)", len(pairs[0]),
                 s.co_window)

  results = {}
  if s.ablation:
    rows = [r.strip() for r in s.ablation_rows.split(",") if r.strip()]
    for row in rows:
      if row not in ROWS:
        raise UserError(f"unknown ablation row {row!r}; valid: {', '.join(ROWS)}")
      t0 = time.time()
      if row == "rq_kmeans":
        cfg = rqvae_config(s, x.shape[1], random_last_level=True)
        codes, x_hat = tokenize(cfg, "rq_kmeans", x, None, None, 0)
      else:
        cfg = rqvae_config(s, x.shape[1], **ablation_overrides(row, s))
        codes, x_hat = tokenize(cfg, "rqvae", x, pairs, ctx.path("ckpt", row), s.save_every)
      rep = report_lib.sid_report(codes, cfg.num_levels, cfg.codebook_size, emb, to_emb(x_hat))
      rep["seconds"] = round(time.time() - t0, 1)
      results[row] = (cfg, codes, rep)
      logging.info("[sids] ablation %s: unique %.4f / %.4f (%.0fs)", row,
                   rep["uniqueness_learned"], rep["uniqueness_full"], rep["seconds"])
    table = report_lib.ablation_markdown([(r, results[r][2]) for r in rows])
    with open(ctx.path("ablation.json"), "w") as f:
      json.dump({r: results[r][2] for r in rows}, f, indent=2)
    with open(ctx.path("ablation.md"), "w") as f:
      f.write(table + "\n")
    logging.info("[sids] ablation:\n%s", table)

  # The artifact's SIDs come from the section's own configuration.
  cfg = rqvae_config(s, x.shape[1])
  if s.tokenizer == "rq_kmeans":
    main = results.get("rq_kmeans")
  else:
    main = next((v for r, v in results.items() if r != "rq_kmeans" and v[0] == cfg), None)
  if main is None:
    codes, x_hat = tokenize(cfg, s.tokenizer, x, pairs, ctx.path("ckpt", "main"),
                            s.save_every)
    rep = report_lib.sid_report(codes, cfg.num_levels, cfg.codebook_size, emb, to_emb(x_hat))
  else:
    _, codes, rep = main
  rep["embedding_seconds"] = round(t_embed, 1)
  rep["total_seconds"] = round(time.time() - start, 1)
  text = report_lib.format_report(rep)
  logging.info("[sids] report:\n%s", text)
  with open(ctx.path("report.json"), "w") as f:
    json.dump(rep, f, indent=2)
  with open(ctx.path("report.txt"), "w") as f:
    f.write(text + "\n")
  tokens.save_sid_table(ctx.path("sid_table.json"), items, codes, cfg.num_levels,
                        cfg.codebook_size)
  return {k: rep[k] for k in ("items", "levels", "uniqueness_learned", "uniqueness_full",
                              "recon_error", "embedding_seconds", "total_seconds")}
