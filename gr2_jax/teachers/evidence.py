"""Evidence shown beside each candidate: the training-period statistics the CF teacher ranks by.

With "evidence" among the prompt's `item_fields`, each candidate line ends with

  `co-watched 37, followed last 4`

where `co-watched` counts how often the candidate co-occurred (within the statistics' window)
with the `recent` most recent history items shown, and `followed last` how often it directly
followed the last history item, both over the training periods only (`cf_stats.compute_stats`,
no validation or test interaction). The CF teacher scores candidates by normalised, recency-
weighted forms of these counts; the prompt shows the raw counts, so that a student can learn to
read them rather than memorise the catalogue's co-occurrences.

With the prompt's `evidence_format = "ranks"` the line shows each count's rank within the slate
instead (`co-watched #2, followed last #1`; 1 = the slate's largest, ties share the better
rank, a zero count reads `none`): reading which candidate holds "#1" is a lookup, where
comparing ten multi-digit counts written digit by digit is arithmetic a small model learns
slowly (BENCHMARKS.md, "probe_choice").
"""

import numpy as np

from gr2_jax.errors import UserError
from gr2_jax.teachers import cf_stats
from gr2_jax.text import prompts

FORMATS = prompts.EVIDENCE_FORMATS


def slate_ranks(counts):
  """Competition ranks within the slate, largest first: 1 + how many counts are larger."""
  c = np.asarray(counts)
  return 1 + (c[None, :] > c[:, None]).sum(1)


class SlateEvidence:
  """(history, slate) item ids -> {candidate item id: evidence text}."""

  def __init__(self, stats: cf_stats.CFStats, recent: int, fmt: str = "counts"):
    if recent < 1:
      raise ValueError(f"evidence needs recent >= 1 history items, got {recent}")
    if fmt not in FORMATS:
      raise UserError(f"evidence format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    self.stats = stats
    self.recent = int(recent)
    self.fmt = fmt

  def counts(self, history, slate):
    """(co-watched [K], followed-last [K]) integer counts of the slate's items."""
    slate = np.asarray(slate, np.int64)
    hist = np.asarray(history, np.int64)[-self.recent:]
    if not len(hist):
      zeros = np.zeros(len(slate), np.int64)
      return zeros, zeros
    cooc = self.stats.cooc[hist][:, slate].sum(0)
    follows = self.stats.transitions[hist[-1], slate]
    return np.rint(cooc).astype(np.int64), np.rint(follows).astype(np.int64)

  def __call__(self, history, slate):
    cooc, follows = self.counts(history, slate)
    if self.fmt == "ranks":
      cooc, follows = (
          [f"#{r}" if c > 0 else "none" for c, r in zip(counts, slate_ranks(counts))]
          for counts in (cooc, follows))
    return {int(i): f"co-watched {c}, followed last {f}"
            for i, c, f in zip(slate, cooc, follows)}


def for_prompt(prompt_cfg, data_dir):
  """A SlateEvidence when `prompt_cfg` shows the "evidence" field, else None.

  The statistics come from the data artifact `data_dir` (training periods only) with the
  prompt's `evidence_window` (`cf_stats.load_stats`, shared with the CF teacher); `recent` is
  the prompt's shown history (`max_history`).
  """
  if "evidence" not in prompt_cfg.item_fields:
    return None
  return SlateEvidence(cf_stats.load_stats(data_dir, prompt_cfg.evidence_window),
                       recent=prompt_cfg.max_history, fmt=prompt_cfg.evidence_format)
