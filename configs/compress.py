"""The context compressor: a decoder, started from the mid-trained model, that rewrites a user's
history into a short summary the re-ranking prompt shows instead; trained by GRPO on compression
and quality rewards, then the RL re-ranker evaluated with the full and the compressed context.

  python -m gr2_jax.main --config=configs/compress.py --workdir=W
  python -m gr2_jax.main --config=configs/compress.py:tiny --workdir=W
  python -m gr2_jax.main --config=configs/compress.py:long --workdir=W  # 1,000 test slates
  python -m gr2_jax.main --config=configs/compress.py --workdir=W \
      --config.compress.quality=judge --config.compress.judge.endpoint=http://127.0.0.1:8000
  python -m gr2_jax.main --config=configs/compress.py --workdir=W \
      --config.compress.quality=utility+judge --config.compress.judge.checkpoint=W/rl/latest

Rewards (`gr2_jax.compress.rewards`): r = (alpha r_comp + (1 - alpha) r_quality) lambda_ellipsis;
quality "utility" (the frozen re-ranker's AUC with the summary vs the full history; no judge),
"judge" (an OpenAI-compatible endpoint grading the rubric, `python -m gr2_jax.serve` serving a
checkpoint of this project; or a local checkpoint judged in this process, no server) or
"utility+judge".
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from gr2_jax import config_lib
from gr2_jax.rl import algorithm

PRESETS = ("default", "tiny", "long")


def section(preset):
  c = ml_collections.ConfigDict()
  c.algorithm = "grpo"
  for f in dataclasses.fields(algorithm.AlgorithmConfig):  # overrides, as in configs/rl.py
    c[f.name] = config_dict.placeholder(f.type)
  c.kl_beta = 0.0  # no reference model: the compressor starts from a model that never summarised
  c.quality = "utility"  # utility | judge | utility+judge
  c.alpha = 0.5  # weight of compression against quality
  c.empty_reward = 0.0
  c.overlong_reward = -1.0  # a summary not shorter than the history it replaces
  c.max_words = 40  # asked for in the compressor's system turn
  c.max_history = 20  # history items the compressor reads (the re-ranking prompt's default)
  # Warm-up: SFT steps on template summaries of training slates (genre shares, decade, recent
  # shift; `compress.context.template_summary`) before GRPO, so that a model that never
  # summarised learns the format and to stop. 0 = none (a pretrained base may not need it).
  c.warmup_steps = 60
  c.warmup_examples = 480
  c.warmup_batch = 8
  c.warmup_lr = 1e-3
  # Rollouts and updates.
  c.group_size = 4
  c.rollout_prompts = 4
  c.train_groups = 4
  c.temperature = 1.0
  c.max_new_tokens = 64  # the summary's token budget
  # Greedy summaries (the table's, the re-ranker's RL contexts) never repeat an n-gram of this
  # many tokens (0 = off); without it a third of them looped to the budget. Rollouts: sampled.
  c.no_repeat_ngram = 3
  c.rollout_batch = 16
  c.iterations = 8
  c.ppo_epochs = 1
  c.minibatches = 2
  c.learning_rate = 1e-5
  c.lr_warmup_steps = 1
  c.end_lr_ratio = 1.0
  c.weight_decay = 0.0
  c.clip_norm = 1.0
  c.frozen_layers = 0
  c.init_from = ""  # a model artifact folder to start from; "" = the mid-trained model
  c.checkpoint_every = 4
  c.seed = 0
  c.val_examples = 0
  # Evaluation: eval_examples seeded slates of eval_split (0 = skip), the re-ranker's decode batch
  # and the slates of the rollout timing.
  c.eval_split = "test"
  c.eval_examples = 96
  c.eval_batch = 32
  c.timing_prompts = 4
  # Reference rows of the table, each paired against the full context: "template" (the
  # statistics summary the warm-up imitates, `compress.context.template_summary`) and "none"
  # (an empty summary block: what the history is worth to the re-ranker). "" = neither.
  c.reference_rows = "template,none"
  # RL iterations of the re-ranker (the rl section's settings, from the RL model) on full and on
  # compressed contexts: their iteration times, and a table row for the one trained on
  # summaries (0 = skip).
  c.rerank_rl_iterations = 3
  c.n_boot = 1000
  c.judge = ml_collections.ConfigDict()
  c.judge.endpoint = ""  # base URL of an OpenAI-compatible server
  # ... or a model artifact folder (midtrain, sft, rl, opd, internalize) judged in this process.
  c.judge.checkpoint = ""
  c.judge.batch_size = 8  # a local judge's decoding batch
  c.judge.max_tokens = 64  # the judge's answer budget
  c.judge.model = "judge"
  c.judge.timeout_s = 10.0
  c.judge.max_retries = 2
  c.judge.backoff_s = 0.5
  c.judge.fallback = 0.5  # the score of a summary the judge could not grade (counted)
  if preset == "tiny":
    c.warmup_steps = 4
    c.warmup_examples = 16
    c.warmup_batch = 4
    c.group_size = 2
    c.rollout_prompts = 2
    c.train_groups = 2
    c.max_new_tokens = 16
    c.rollout_batch = 4
    c.iterations = 2
    c.minibatches = 1
    c.checkpoint_every = 1
    c.eval_examples = 8
    c.eval_batch = 8
    c.timing_prompts = 2
    c.rerank_rl_iterations = 2
    c.n_boot = 50
  elif preset == "long":
    # More weight on compression, twice the iterations, and the table on 1,000 test slates
    # (the upstream stages stay the default pipeline's): 37 min for this stage on 2 cores.
    c.alpha = 0.8
    c.iterations = 16
    c.eval_examples = 1000
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
