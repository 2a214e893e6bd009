"""Quality report of a SID assignment: uniqueness, code usage, reconstruction, neighbourhoods."""

import numpy as np

from gr2_jax.sids import codes as codes_lib


def level_stats(codes, codebook_size):
  """Per level: fraction of the C codes in use and perplexity exp(entropy) of their usage."""
  out = []
  for col in np.asarray(codes).T:
    p = np.bincount(col, minlength=codebook_size) / len(col)
    nz = p[p > 0]
    out.append({"utilisation": float(len(nz) / codebook_size),
                "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))})
  return out


def neighbourhood(emb, first_code, k=10, chunk=1024):
  """(share, chance): how often an item's k nearest neighbours by cosine share its first code.

  `chance` is the rate that k neighbours drawn at random from the other items would give.
  """
  emb = np.asarray(emb, np.float32)
  emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  first_code = np.asarray(first_code)
  n = len(emb)
  k = min(k, n - 1)
  same = 0
  for s in range(0, n, chunk):
    sim = emb[s:s + chunk] @ emb.T
    sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf  # not one's own neighbour
    nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    same += (first_code[nn] == first_code[s:s + chunk, None]).sum()
  counts = np.bincount(first_code)
  chance = float((counts * (counts - 1)).sum() / (n * (n - 1)))
  return float(same / (n * k)), chance


def recon_error(x, x_hat):
  """Fraction of the embeddings' variance the reconstruction misses."""
  x = np.asarray(x, np.float64)
  return float(((x - np.asarray(x_hat)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def sid_report(codes, num_learned, codebook_size, emb, x_hat):
  """Report dict for codes [N, L_all] whose first `num_learned` levels were learned."""
  codes = np.asarray(codes)
  share, chance = neighbourhood(emb, codes[:, 0])
  return {
      "items": int(len(codes)),
      "levels": int(codes.shape[1]),
      "learned_levels": int(num_learned),
      "codebook_size": int(codebook_size),
      "uniqueness_learned": codes_lib.uniqueness(codes[:, :num_learned]),
      "uniqueness_full": codes_lib.uniqueness(codes),
      "largest_collision": codes_lib.largest_collision(codes[:, :num_learned]),
      "levels_stats": level_stats(codes, codebook_size),
      "recon_error": recon_error(emb, x_hat),
      "nn10_same_first_code": share,
      "nn10_chance": chance,
  }


def format_report(rep):
  """Plain-text table of a report."""
  lines = [
      f"items {rep['items']}, levels {rep['levels']} ({rep['learned_levels']} learned), "
      f"codebook {rep['codebook_size']}",
      f"uniqueness learned levels   {rep['uniqueness_learned']:.4%}",
      f"uniqueness with disambig.   {rep['uniqueness_full']:.4%}",
      f"largest collision group     {rep['largest_collision']}",
      f"reconstruction error (FVU)  {rep['recon_error']:.4f}",
      f"10-NN share first code      {rep['nn10_same_first_code']:.4f} "
      f"(chance {rep['nn10_chance']:.4f})",
      "level  utilisation  perplexity",
  ]
  for i, s in enumerate(rep["levels_stats"]):
    lines.append(f"{chr(ord('a') + i):>5}  {s['utilisation']:11.4f}  {s['perplexity']:10.1f}")
  return "\n".join(lines)


def ablation_markdown(rows):
  """rows: [(name, report)] -> markdown table."""
  out = ["| tokenizer | unique (learned) | unique (+disamb.) | level-1 util. | recon err | "
         "10-NN same code (chance) |",
         "|---|---|---|---|---|---|"]
  for name, r in rows:
    out.append(f"| {name} | {r['uniqueness_learned']:.2%} | {r['uniqueness_full']:.2%} | "
               f"{r['levels_stats'][0]['utilisation']:.2%} | {r['recon_error']:.4f} | "
               f"{r['nn10_same_first_code']:.3f} ({r['nn10_chance']:.3f}) |")
  return "\n".join(out)
