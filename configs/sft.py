"""SFT: the mid-trained model learns the accepted teacher traces of one sampling mode, loss on
the assistant turn only, reasoning tokens weighted lambda_r and ranking tokens lambda_o.

  python -m gr2_jax.main --config=configs/sft.py --workdir=W                      # rejection
  python -m gr2_jax.main --config=configs/sft.py --workdir=W --config.sft.mode=targeted
  python -m gr2_jax.main --config=configs/sft.py:tiny --workdir=W
"""

import ml_collections

from gr2_jax import config_lib

PRESETS = ("default", "tiny", "smollm2")


def section(preset):
  c = ml_collections.ConfigDict()
  c.mode = "rejection"  # which traces: "rejection" or "targeted"
  c.lambda_r = 0.3  # loss weight of reasoning (explanation) tokens
  c.lambda_o = 1.0  # loss weight of ranking tokens (the recommendations and the turn's end)
  # Loss weight of the ranking's first entry (its number or SID tokens; 0 = lambda_o): the
  # choice R@1 scores, one token of ~36 in a numbered answer.
  c.lambda_first = 0.0
  c.num_devices = 0  # 0 = all; the mesh is (data = devices, 1, 1)
  c.seq_len = 704  # packed row length; longer conversations are dropped and counted
  c.batch_size = 4
  c.micro_batches = 1
  c.epochs = 1.25  # passes over the packed rows (sets the steps unless `steps` > 0)
  c.steps = 0
  c.learning_rate = 1e-3
  c.lr_warmup_steps = 10
  c.end_lr_ratio = 0.1
  c.weight_decay = 0.01
  c.clip_norm = 1.0
  # Layers below this index and the token embedding stay fixed (`OptimConfig.frozen_layers`):
  # no backward pass below them, no AdamW state for them. 0 trains every layer.
  c.frozen_layers = 0
  # Attention routing (`gr2_jax.train.route`), numbered answers only: at each number the answer
  # writes, the heads of KV group `route_group` of layer `route_layer` (-1 = the last) are taught
  # to look at the end of that candidate's prompt line (with `traces.prompt.number_again`, the
  # number itself). route_weight is per routed number, in the token loss's units; 0 = off.
  c.route_weight = 0.0
  c.route_layer = -1
  c.route_group = 0
  c.route_eval_every = 25  # fit curve of both losses on the first route_eval_rows rows
  c.route_eval_rows = 16
  c.log_every = 10
  c.checkpoint_every = 50
  c.seed = 0
  # Evaluation of the trained model on a seeded subset of test slates (0 = skip).
  c.eval_split = "test"
  c.eval_examples = 48
  c.max_new_tokens = 240  # CF-teacher answers are ~220 tokens with the demo tokenizer
  c.eval_batch = 48
  c.n_boot = 1000
  if preset == "smollm2":
    # The upper 10 of SmolLM2's 30 layers learn the teacher's orders (one trace per row).
    c.seq_len = 640
    c.epochs = 0.6  # ~70 steps of 4 traces: ~9 s each with 20 of 30 layers frozen
    c.learning_rate = 1e-4
    c.frozen_layers = 20
    c.checkpoint_every = 25
    c.eval_examples = 96
    c.max_new_tokens = 40  # {"recommendations": [3, 1, ...]} is ~32 tokens
  if preset == "tiny":
    c.num_devices = 1
    c.seq_len = 1536
    c.batch_size = 2
    c.epochs = 0.0
    c.steps = 4
    c.lr_warmup_steps = 1
    c.log_every = 2
    c.checkpoint_every = 2
    c.eval_examples = 4
    c.max_new_tokens = 24
    c.eval_batch = 4
    c.n_boot = 50
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
