"""Trace generation: a teacher writes explained re-rankings of training slates, by targeted
sampling (the teacher sees the target) and by rejection sampling (target hidden, up to
`max_tries` attempts, kept when the acceptance rule holds).

  python -m gr2_jax.main --config=configs/traces.py --workdir=W
  python -m gr2_jax.main --config=configs/traces.py:tiny --workdir=W
  python -m gr2_jax.main --config=configs/traces.py --workdir=W \
    --config.traces.prompt.answer_format=positions   # rank the candidates' numbers 1..K
"""

import ml_collections

from gr2_jax import config_lib
from gr2_jax.teachers import cf

PRESETS = ("default", "tiny", "smollm2")


def prompt_section(preset="default"):
  """Prompt fields (`gr2_jax.text.prompts.PromptConfig`), shared by SFT and evaluation."""
  p = ml_collections.ConfigDict()
  p.max_history = 8
  # SIDs and genres: the titles are what mid-training's captioning task ties to the SIDs, and
  # leaving them out halves the prompt for the small CPU models (add "title", "year" for LLMs).
  p.item_fields = ("sid", "genres")
  p.part_order = "system_user_candidates"  # or "system_candidates_user" (shared prefix)
  p.reasoning = True
  p.include_user = True
  # "sids": the answer lists the candidates' SIDs (paper 1); "positions": the prompt numbers the
  # candidates 1..K and the answer lists the numbers (technical report), no SID copying;
  # "positions0": numbered 0..K-1 (one token per number for K <= 10 with digit tokenizers).
  p.answer_format = "sids"
  # "evidence" in item_fields ends each candidate line with training-period counts
  # (`gr2_jax.teachers.evidence`: co-watched with the shown history, followed the last item);
  # this is their co-occurrence window, and "counts" shows the counts, "ranks" their rank
  # within the slate (#1 = largest).
  p.evidence_window = 5
  p.evidence_format = "counts"
  # Numbered formats: each candidate line ends with its number again (`... -> 3`), the token
  # `sft.route_weight` routes the answer's heads to.
  p.number_again = False
  if preset == "tiny":
    p.max_history = 5
  if preset == "smollm2":
    # A pretrained LLM knows films by name: titles and years beside the SIDs; the answer is the
    # candidates' numbers and no explanation (~30 answer tokens instead of ~170 with one: the
    # 2-core budget). `--config.traces.prompt.reasoning=True` brings the explanation back.
    p.item_fields = ("sid", "title", "year", "genres")
    p.max_history = 6
    p.answer_format = "positions"
    p.reasoning = False
  return p


def section(preset):
  c = ml_collections.ConfigDict()
  c.split = "train"  # slates the traces explain (validation / test are never trained on)
  c.max_examples = 800  # a seeded subset of the split's slates (0 = all)
  c.modes = ("targeted", "rejection")
  c.max_tries = 8  # rejection sampling attempts per example
  # "top1": the teacher's first item is the target; "positives_first": every positive label of
  # the slate precedes every negative (multi-positive slates).
  # "any": every valid answer (the teacher's own orders; with cf.temperature 0 its greedy ones).
  c.acceptance = "top1"
  # Show each slate in a seeded random order (labels and answers follow) instead of the legacy
  # order, so that SFT cannot learn to rank the first shown candidate first.
  c.shuffle_display = False
  # "cf": the collaborative-filtering teacher (no LLM); "checkpoint": a gr2_jax model (an sft or
  # midtrain artifact folder in teacher_checkpoint) sampled on device at teacher_temperature.
  c.teacher = "cf"
  c.teacher_checkpoint = ""
  c.teacher_temperature = 1.0
  c.teacher_max_new_tokens = 256
  c.cf = cf.default_config()
  c.cf.trace_candidates = 1  # keeps traces short for the small models trained on them
  c.cf_window = 5  # co-occurrence window of the teacher's statistics
  c.prompt = prompt_section(preset)
  c.teacher_eval_examples = 4000  # validation slates for teacher vs legacy (0 = all)
  c.tokenizer = ""  # optional tokenizer folder (e.g. a midtrain artifact's tokenizer/) for lengths
  c.n_boot = 1000
  c.seed = 0
  if preset == "tiny":
    c.max_examples = 40
    c.max_tries = 4
    c.teacher_eval_examples = 200
    c.n_boot = 100
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
