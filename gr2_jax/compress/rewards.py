"""The context compressor's rewards (GR2_SPEC item 8), registered in `COMPRESS_REWARDS`.

  r = (alpha * r_comp + (1 - alpha) * r_quality) * lambda_ellipsis

- r_comp = max(0, 1 - |c| / |o|), in tokens of the re-ranking prompt (summary block vs history
  block).
- lambda_ellipsis in [0, 1], a multiplicative penalty for truncation shortcuts: 0 for "...",
  "…" or "etc."; 0 for a summary cut at the token budget; 0.5 for a summary that copies the input
  (over half of its word 5-grams appear verbatim in the context); else 1.
- r_quality: "utility" (no judge) = clip(1 + AUC_c - AUC_o, 0, 1): the frozen re-ranker's AUC on
  the slate with the summary against its AUC with the full history (1 at iso-quality or
  better); "judge" = the judge's rubric score (`judge_score`); "preservation" (no judge, no
  re-ranker) = what the summary says of the history that is true (`preservation`); a "+" joins
  several, whose mean is the quality.
- An empty summary gets `empty_reward` (0) and an over-long one (not shorter than the history
  block it replaces) `overlong_reward` (-1), whatever else it scores; both counted. (One cut at
  the token budget has lambda_ellipsis 0, so it scores 0.)
"""

import re

import numpy as np

from gr2_jax.errors import UserError
from gr2_jax.rl.registry import COMPRESS_REWARDS

QUALITY_TERMS = ("utility", "judge", "preservation")
QUALITIES = ("utility", "judge", "utility+judge", "preservation", "utility+preservation")
_SHORTCUT = re.compile(r"\.\.\.|…|\betc\b\.?", re.IGNORECASE)
_WORD = re.compile(r"\w+")
COPY_NGRAM = 5
COPY_SHARE = 0.5


@COMPRESS_REWARDS.register("compression")
def compression(summary_tokens, context_tokens):
  """r_comp = max(0, 1 - |c| / |o|) per summary."""
  c = np.asarray(summary_tokens, np.float64)
  o = np.maximum(np.asarray(context_tokens, np.float64), 1)
  return np.maximum(0.0, 1.0 - c / o).astype(np.float32)


def _ngrams(words, n):
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copied_share(summary, context, n=COPY_NGRAM):
  """Share of the summary's word n-grams found verbatim in the context (0 if it has none)."""
  s = [w.lower() for w in _WORD.findall(summary)]
  grams = _ngrams(s, n)
  if not grams:
    return 0.0
  return len(grams & _ngrams([w.lower() for w in _WORD.findall(context)], n)) / len(grams)


@COMPRESS_REWARDS.register("ellipsis")
def ellipsis_penalty(summaries, contexts, finished):
  """lambda_ellipsis per summary (see the module docstring)."""
  out = np.ones(len(summaries), np.float32)
  for i, (s, ctx, done) in enumerate(zip(summaries, contexts, finished)):
    if _SHORTCUT.search(s) or not done:
      out[i] = 0.0
    elif copied_share(s, ctx) > COPY_SHARE:
      out[i] = 0.5
  return out


@COMPRESS_REWARDS.register("utility")
def utility(auc_compressed, auc_full):
  """clip(1 + AUC_c - AUC_o, 0, 1); a slate without both a positive and a negative (NaN AUC)
  scores 1 (the summary cannot lose what the slate cannot measure)."""
  d = np.asarray(auc_compressed, np.float64) - np.asarray(auc_full, np.float64)
  return np.clip(1.0 + np.nan_to_num(d, nan=0.0), 0.0, 1.0).astype(np.float32)


_DECADE = re.compile(r"(?<!\w)(\d{3}0)s(?!\w)")


def _named_share(named, shares):
  """Share of the history carried by the names a summary gives, over the most that as many
  names can carry: 1 for naming the k largest, less for smaller or absent ones, 0 for none."""
  if not named:
    return 0.0
  best = sum(sorted(shares.values(), reverse=True)[:len(named)])
  return sum(shares.get(n, 0.0) for n in named) / best if best > 0 else 0.0


@COMPRESS_REWARDS.register("preservation")
def preservation(summaries, genre_shares, decade_shares, genres):
  """A verifiable stand-in for the judge's preservation score, in [0, 1] per summary: the mean
  of a genre part and a decade part (the decade part only when the history has years), each
  `_named_share` of the names the summary gives. Genres are matched as whole words,
  case-insensitively, from the catalogue's list `genres`; decades as "1990s". "Likes Drama" of
  a history that is mostly Drama scores 1 on genres; "Likes Comedy" of it, Comedy's share over
  Drama's."""
  pats = {g: re.compile(r"(?<!\w)" + re.escape(g) + r"(?!\w)", re.IGNORECASE) for g in genres}
  out = np.zeros(len(summaries), np.float32)
  for i, (s, gs, ds) in enumerate(zip(summaries, genre_shares, decade_shares)):
    parts = [_named_share({g for g, p in pats.items() if p.search(s)}, gs)]
    if ds:
      parts.append(_named_share(set(m.group(1) + "s" for m in _DECADE.finditer(s)), ds))
    out[i] = np.mean(parts)
  return out


@COMPRESS_REWARDS.register("judge")
def judge_score(solvable, preservation, quality):
  """r_judge = 0.2 p/10 + 0.8 q/10 if solvable else 0.8 p/10 + 0.2 q/10."""
  p = np.asarray(preservation, np.float64) / 10
  q = np.asarray(quality, np.float64) / 10
  return np.where(np.asarray(solvable, bool), 0.2 * p + 0.8 * q, 0.8 * p + 0.2 * q).astype(
      np.float32)


def total(comp, quality, penalty, *, alpha, empty, overlong, empty_reward=0.0,
          overlong_reward=-1.0):
  """The summary's reward; empty and over-long summaries get their fixed rewards."""
  if not 0 <= alpha <= 1:
    raise UserError(f"compress.alpha must be in [0, 1], got {alpha}")
  r = (alpha * np.asarray(comp) + (1 - alpha) * np.asarray(quality)) * np.asarray(penalty)
  r = np.where(np.asarray(overlong, bool), overlong_reward, r)
  return np.where(np.asarray(empty, bool), empty_reward, r).astype(np.float32)
