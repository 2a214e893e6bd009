"""SmolLM2-135M-Instruct (the real weights, from the pinned GGUF) on this machine: training
tokens/s and MFU, prefill and decode tokens/s, and decoding against the memory-bandwidth bound.

  python benchmarks/bench_smollm2.py            # float32 and bfloat16, the full sizes below
  python benchmarks/bench_smollm2.py --quick    # 1 layer, tiny sizes, < 1 min, nothing appended
  python benchmarks/bench_smollm2.py --dtypes=float32 --batch_sizes=1,8   # a shorter full run

On a 2-core CPU the full run takes long, bfloat16 most (XLA:CPU's bf16 matrix-vector products
are several times slower than float32 ones there): start with --dtypes=float32.

Prints a markdown table and appends it, with the machine's description, to BENCHMARKS.md.

Peaks, measured in the same run: the matmul peak is the best FLOP/s of an n x n x n jnp.dot
(float32 and bfloat16); the copy bandwidth is bytes read + written per second by a jitted
`a + 1` on a large float32 array updated in place (`common.copy_bandwidth`).

Training: one AdamW step (value_and_grad + update, jitted, state donated) on a batch of
`train_batch` x `train_seq` random tokens, three losses:
- "all": the trainer's loss (`gr2_jax.train.trainer.token_loss`, chunked log-softmax) with
  every token weighted;
- "last K, weights": the same loss with weight only on the last K (`answer_tokens`) targets,
  the LM head still at every position (what a masked SFT loss costs in the trainer);
- "last K, head at K": the hidden states of the last K positions only go through the LM head
  (`Qwen3.hidden`, then `qwen3.chunked_token_logps`);
- "last K, head at K, layers < N frozen": that loss with `OptimConfig.frozen_layers` = N (the
  embedding and layers 0..N-1 under stop_gradient, no AdamW state for them), for each --frozen;
and, with --unchunked, the "all" loss from full [B, T, V] logits (the trainer before chunking).
Model FLOPs (MaxText's accounting: the matmuls really done, causal masking not credited):
forward per token = 2 N_layers + 4 L T H D (attention scores and mixing over T keys) + 2 V E
for each position that goes through the LM head; a training step is 3x the forward (with N
frozen layers: the forward plus 2x the forward of the trained layers, plus 1x the head's for the
gradient of its input: the tied head is frozen with the embedding). MFU is
model FLOP/s over the float32 matmul peak, for bfloat16 compute too (on a CPU without bf16
matrix units bf16 runs slower than f32; the bf16 peak is listed for comparison). "Temp MB" is
XLA's compiled temporary buffer size of the step (`memory_analysis`), where the logits live.

Sampling: `sampler.prefill` and the `sampler.decode` loop (greedy, no stop token) at each batch
size, prompts of `prompt_len` random tokens, `new_tokens` generated per row; parameters, compute
and KV cache in the dtype of the row. The decode bound at batch 1 is copy bandwidth / weight
bytes per token (every parameter is read once per step; the tied LM head reads the embedding),
KV-cache reads not counted.
"""

import dataclasses
import functools
import os
import sys
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # pylint: disable=g-import-not-at-top
from gr2_jax.models import gguf_io  # pylint: disable=g-import-not-at-top
from gr2_jax.models import qwen3  # pylint: disable=g-import-not-at-top
from gr2_jax.sampling import sampler  # pylint: disable=g-import-not-at-top
from gr2_jax.train import optim  # pylint: disable=g-import-not-at-top
from gr2_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Shrink everything (1 layer, tiny batches) to check that the "
                  "script runs, in under a minute; nothing is appended.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure.")
flags.DEFINE_integer("layers", 0, "Use only the first N layers of the model (0 = all 30).")
flags.DEFINE_integer("train_batch", 4, "Training: sequences per batch.")
flags.DEFINE_integer("train_seq", 256, "Training: tokens per sequence.")
flags.DEFINE_integer("answer_tokens", 32, "Training: the answer tokens of the answer-only loss.")
flags.DEFINE_integer("train_steps", 3, "Training: timed steps (the median is reported).")
flags.DEFINE_integer("loss_chunk", trainer_lib.LOSS_CHUNK, "Training: log-softmax chunk.")
flags.DEFINE_list("frozen", ["24"], "Training: also time the answer loss with the embedding and "
                  "the layers below each of these indices frozen (`OptimConfig.frozen_layers`).")
flags.DEFINE_bool("unchunked", True, "Training: also time the loss from full [B, T, V] logits.")
flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Sampling: batch sizes.")
flags.DEFINE_integer("prompt_len", 256, "Sampling: prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 64, "Sampling: generated tokens per row.")
flags.DEFINE_integer("reps", 3, "Sampling: timed repetitions (the median is reported).")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that measures the peak.")
flags.DEFINE_integer("copy_mb", 512, "Size of the array whose copy measures the bandwidth.")
flags.DEFINE_string("out", common.BENCHMARKS_MD, "Markdown file the results are appended to.")
flags.DEFINE_bool("write", True, "Append the results to --out (never with --quick).")

QUICK = dict(layers=1, train_batch=1, train_seq=32, answer_tokens=8, train_steps=1,
             loss_chunk=16, unchunked=False, batch_sizes=["1"], prompt_len=16, new_tokens=4,
             reps=1, matmul_size=512, copy_mb=64, frozen=["1"])


def with_layers_and_dtype(model, num_layers, param_dtype, dtype):
  """A copy of `model` with its first `num_layers` layers and the given dtypes."""
  cfg = dataclasses.replace(model.cfg, num_layers=num_layers, param_dtype=param_dtype,
                            dtype=dtype)
  params = nnx.to_pure_dict(nnx.state(model))
  params["layers"] = {i: params["layers"][i] for i in range(num_layers)}
  params = jax.tree.map(lambda x: x.astype(param_dtype), params)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(abstract, params)
  return nnx.merge(graphdef, abstract)


def layer_matmul_params(cfg):
  e, h, kvh, d, m = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.mlp_dim)
  return cfg.num_layers * (2 * e * h * d + 2 * e * kvh * d + 3 * e * m)


def train_flops(cfg, batch, seq, head_positions, frozen=0):
  """Model FLOPs of one training step (module docstring); with `frozen` layers the backward
  pass (2x the forward) covers only the layers above them, and the tied LM head (frozen with
  the embedding) only the gradient of its input."""
  per_layer = (2 * layer_matmul_params(cfg) // cfg.num_layers
               + 4 * seq * cfg.num_heads * cfg.head_dim) * batch * seq
  head = 2 * cfg.vocab_size * cfg.hidden_size * batch * head_positions
  forward = per_layer * cfg.num_layers + head
  if not frozen:
    return 3 * forward
  return forward + 2 * per_layer * (cfg.num_layers - frozen) + head * (
      1 if cfg.tie_embeddings else 2)


def answer_loss(graphdef, params, batch, k, chunk):
  """token_loss over the last k positions, with the LM head only at those positions."""
  model = nnx.merge(graphdef, params)
  hidden, _ = model.hidden(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
  logp = qwen3.chunked_token_logps(hidden[:, -k:], model.logits, batch["targets"][:, -k:], chunk)
  w = batch["weights"][:, -k:].astype(jnp.float32)
  return -jnp.sum(logp * w), jnp.sum(w)


def full_logits_loss(graphdef, params, batch):
  """token_loss from full [B, T, V] logits (no chunking)."""
  logits, _ = qwen3.apply(graphdef, params, batch["tokens"], batch["positions"],
                          segment_ids=batch["segment_ids"])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  w = batch["weights"].astype(jnp.float32)
  return jnp.sum(nll * w), jnp.sum(w)


def frozen_loss(graphdef, params, batch, loss_fn, frozen):
  return loss_fn(graphdef, optim.stop_frozen(params, frozen), batch)


def bench_train(model, loss_fn, weights, compiled_steps, frozen=0):
  """Seconds per AdamW step, compile seconds and temp bytes of `loss_fn` on a random batch.

  compiled_steps: a dict that keeps the compiled step per loss_fn across calls (the weights
  change no shape, so two weightings of one loss share a compilation).
  """
  graphdef, state = nnx.split(model)
  params = jax.tree.map(jnp.copy, nnx.to_pure_dict(state))  # the step donates its copy
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-5, clip_norm=0.0,
                                              frozen_layers=frozen))
  b, t = FLAGS.train_batch, FLAGS.train_seq
  tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (b, t + 1))
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(t), (b, t)),
           "segment_ids": np.ones((b, t)), "weights": weights}
  batch = {k: jnp.asarray(v, jnp.float32 if k == "weights" else jnp.int32)
           for k, v in batch.items()}

  def step(params, opt_state, batch):
    (l, w), grads = jax.value_and_grad(lambda p: loss_fn(graphdef, p, batch),
                                       has_aux=True)(params)
    grads = jax.tree.map(lambda g: g / jnp.maximum(w, 1.0), grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, l / w

  opt_state = tx.init(params)
  compile_s = None
  if loss_fn not in compiled_steps:
    start = time.perf_counter()
    compiled_steps[loss_fn] = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, opt_state, batch).compile()
    compile_s = time.perf_counter() - start
  compiled = compiled_steps[loss_fn]
  memory = compiled.memory_analysis()
  temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
  params, opt_state, loss = compiled(params, opt_state, batch)  # warm-up
  jax.block_until_ready(loss)
  times = []
  for _ in range(FLAGS.train_steps):
    start = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, batch)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  return {"step_s": float(np.median(times)), "compile_s": compile_s, "temp": temp,
          "loss": float(loss)}


def bench_sampling(model, batch, cache_dtype):
  """Prefill and decode tokens/s at one batch size."""
  graphdef, state = nnx.split(model)
  p, n = FLAGS.prompt_len, FLAGS.new_tokens
  rng = np.random.default_rng(batch)
  prompts = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (batch, p)), jnp.int32)
  lengths = jnp.full((batch,), p, jnp.int32)
  params = sampler.SamplingParams(max_new_tokens=n, greedy=True)
  key = jax.random.key(0)

  # Each prefill's cache feeds one decode (which donates it): reps + 1 of each, the first
  # of each compiling and not timed.
  prefill_s, decode_s, prefilled = [], [], []
  for i in range(FLAGS.reps + 1):
    start = time.perf_counter()
    prefilled.append(jax.block_until_ready(sampler.prefill(
        graphdef, state, prompts, lengths, cache_len=p + n, cache_dtype=cache_dtype)))
    if i:
      prefill_s.append(time.perf_counter() - start)
  for i, (logits, cache) in enumerate(prefilled):
    start = time.perf_counter()
    out, _, _ = jax.block_until_ready(sampler.decode(graphdef, state, logits, cache, lengths,
                                                     key, None, params=params))
    if i:
      decode_s.append(time.perf_counter() - start)
    assert int(np.asarray(out.lengths).min()) == n
  return {"batch": batch, "prefill": batch * p / np.median(prefill_s),
          "decode": batch * n / np.median(decode_s)}


def main(argv):
  del argv
  if FLAGS.quick:
    for name, value in QUICK.items():
      setattr(FLAGS, name, value)
  machine = common.machine_description()
  base, cfg, _ = gguf_io.load_gguf("smollm2")
  num_layers = FLAGS.layers or cfg.num_layers
  print(f"# {machine}; SmolLM2-135M-Instruct, {num_layers} of {cfg.num_layers} layers",
        flush=True)

  peak = common.matmul_peak(FLAGS.matmul_size, jnp.float32)
  peak_bf16 = common.matmul_peak(FLAGS.matmul_size, jnp.bfloat16)
  bandwidth = common.copy_bandwidth(FLAGS.copy_mb << 20)
  print(f"matmul peak f32 {peak / 1e9:.1f} GFLOP/s, bf16 {peak_bf16 / 1e9:.1f} GFLOP/s; "
        f"copy {bandwidth / 1e9:.1f} GB/s", flush=True)

  b, t, k = FLAGS.train_batch, FLAGS.train_seq, FLAGS.answer_tokens
  every = np.ones((b, t), np.float32)
  last = np.zeros((b, t), np.float32)
  last[:, -k:] = 1.0
  chunk = FLAGS.loss_chunk
  trainer_loss = functools.partial(trainer_lib.token_loss, loss_chunk=chunk)
  losses = [
      ("all", f"all {t}", trainer_loss, every, t),
      (f"last {k}, weights", f"all {t}", trainer_loss, last, t),
      (f"last {k}, head at {k}", f"last {k}", functools.partial(answer_loss, k=k, chunk=chunk),
       last, k),
  ]
  for n in [int(x) for x in FLAGS.frozen]:
    losses.append((f"last {k}, head at {k}, layers < {n} frozen", f"last {k}",
                   functools.partial(frozen_loss, loss_fn=losses[-1][2], frozen=n), last, k, n))
  if FLAGS.unchunked:
    losses.append(("all, full logits", f"all {t}", full_logits_loss, every, t))
  losses = [x if len(x) == 6 else x + (0,) for x in losses]
  train_rows, sample_rows, bounds = [], [], []
  for dtype in FLAGS.dtypes:
    model = with_layers_and_dtype(base, num_layers, "float32", dtype)
    compiled_steps = {}
    for name, head, loss_fn, weights, head_positions, frozen in losses:
      r = bench_train(model, loss_fn, weights, compiled_steps, frozen)
      flops = train_flops(model.cfg, b, t, head_positions, frozen)
      r.update(dtype=dtype, loss_on=name, head=head, tok_s=b * t / r["step_s"],
               flops=flops / r["step_s"])
      print(r, flush=True)
      train_rows.append(r)
    model = with_layers_and_dtype(base, num_layers, dtype, dtype)
    for batch in [int(x) for x in FLAGS.batch_sizes]:
      r = dict(bench_sampling(model, batch, jnp.dtype(dtype)), dtype=dtype)
      print(r, flush=True)
      sample_rows.append(r)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    b1 = [r["decode"] for r in sample_rows if r["dtype"] == dtype and r["batch"] == 1]
    bounds.append({"dtype": dtype, "weight_bytes": weight_bytes,
                   "bound": bandwidth / weight_bytes, "decode_b1": b1[0] if b1 else None})

  total, _ = qwen3.param_counts(model)
  command = " ".join(["python benchmarks/bench_smollm2.py"] + sys.argv[1:])
  lines = [
      f"### bench_smollm2: SmolLM2-135M-Instruct (Q4_1 GGUF dequantised), {num_layers} of "
      f"{cfg.num_layers} layers, {total / 1e6:.1f}M parameters",
      "",
      f"Machine: {machine}. Command: `{command}`.",
      "",
      f"Peaks: float32 matmul ({FLAGS.matmul_size}^3 jnp.dot) {peak / 1e9:,.1f} GFLOP/s, "
      f"bfloat16 {peak_bf16 / 1e9:,.1f} GFLOP/s; copy bandwidth ({FLAGS.copy_mb} MB float32 "
      f"in place, read + written) {bandwidth / 1e9:,.1f} GB/s.",
      "",
      f"Training: AdamW step on {b} x {t} tokens, float32 parameters, log-softmax chunks of "
      f"{chunk} positions; MFU = model FLOP/s / float32 matmul peak (FLOPs: see the script's "
      "docstring).",
      "",
      "| compute | loss on | LM head at | tokens/s | step s | model GFLOP/s | MFU "
      "| compile s | temp MB |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in train_rows:
    temp = f"{r['temp'] / 2**20:,.0f}" if r["temp"] is not None else "n/a"
    compile_s = "same step" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
    lines.append(f"| {r['dtype']} | {r['loss_on']} | {r['head']} | {r['tok_s']:,.0f} | "
                 f"{r['step_s']:.3f} | {r['flops'] / 1e9:,.1f} | {r['flops'] / peak:.1%} | "
                 f"{compile_s} | {temp} |")
  if sample_rows:  # --batch_sizes= (empty) measures training only
    lines += [
        "",
        f"Sampling: prompts of {FLAGS.prompt_len} tokens, {FLAGS.new_tokens} greedy tokens per "
        "row; parameters, compute and KV cache in the row's dtype.",
        "",
        "| dtype | batch | prefill tok/s | decode tok/s |",
        "|---|---:|---:|---:|",
    ]
    for r in sample_rows:
      lines.append(f"| {r['dtype']} | {r['batch']} | {r['prefill']:,.0f} | {r['decode']:,.1f} |")
    lines += [
        "",
        "Decode bound at batch 1 = copy bandwidth / weight bytes per token:",
        "",
        "| dtype | weight MB | bound tok/s | decode tok/s, batch 1 | of bound |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in bounds:
      got = r["decode_b1"]
      lines.append(f"| {r['dtype']} | {r['weight_bytes'] / 2**20:,.0f} | {r['bound']:,.1f} | "
                   + (f"{got:,.1f} | {got / r['bound']:.0%} |" if got else "n/a | n/a |"))
  lines.append("")
  table = "\n".join(lines)
  print("\n" + table)
  if FLAGS.write and not FLAGS.quick:
    common.append_section(table, FLAGS.out)
  elif FLAGS.quick:
    print("(--quick: not appended to BENCHMARKS.md)")


if __name__ == "__main__":
  app.run(main)
