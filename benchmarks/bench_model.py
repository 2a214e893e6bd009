"""Throughput of the Qwen3 model: prefill, cached decode vs. no-cache recompute, training step.

Prints a markdown table and appends it, with the machine's description, to BENCHMARKS.md.
Runs unchanged on CPU, GPU and TPU (compute dtype float32 on CPU, bfloat16 elsewhere, unless
--dtype says otherwise).

  python benchmarks/bench_model.py            # demo preset, batches 1, 8, 64 (~2-3 min on 2 CPU cores)
  python benchmarks/bench_model.py --batch_sizes=1,8 --gen_len=8 --nowrite

FLOP accounting (what the code really computes, causal masking not credited):
  matmul parameters N = every projection kernel + the LM head (V x E; tied or not);
  embedding lookups and norms are not matmuls and are not counted.
  Forward FLOPs per token = 2 N + 4 L T H D (scores QK^T and the weighted sum PV over all T
  key positions, H query heads of size D, L layers).
  Training step FLOPs = 3 x forward (backward = 2 x forward) = (6 N + 12 L T H D) x tokens.
  Peak = a large square matmul (2 n^3 FLOPs) in the model's compute dtype, measured in the
  same run; the fraction achieved/peak is reported as "of peak".
"""

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
from gr2_jax.models import qwen3  # pylint: disable=g-import-not-at-top
from gr2_jax.sampling import sampler  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "demo", "Model preset of gr2_jax.models.qwen3.")
flags.DEFINE_string("dtype", "auto", "Compute dtype; auto = float32 on CPU, bfloat16 elsewhere.")
flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Batch sizes of the sampling benchmark.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
flags.DEFINE_integer("gen_len", 16, "Generated tokens per row.")
flags.DEFINE_integer("reps", 3, "Timed repetitions (the median is reported).")
flags.DEFINE_integer("recompute_reps", 1, "Timed repetitions of the slow no-cache loop.")
flags.DEFINE_integer("train_batch", 8, "Training step: sequences per batch.")
flags.DEFINE_integer("train_seq", 128, "Training step: tokens per sequence.")
flags.DEFINE_integer("train_steps", 3, "Training step: timed steps.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul that measures peak FLOP/s.")
flags.DEFINE_string("out", common.BENCHMARKS_MD, "Markdown file the results are appended to.")
flags.DEFINE_bool("write", True, "Append the results to --out.")


def matmul_params(cfg):
  """Parameters that take part in a matmul: projections and the LM head."""
  e, h, kvh, d, m = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.mlp_dim)
  per_layer = e * h * d * 2 + e * kvh * d * 2 + 3 * e * m
  return cfg.num_layers * per_layer + cfg.vocab_size * e


def forward_flops_per_token(cfg, context):
  return 2 * matmul_params(cfg) + 4 * cfg.num_layers * context * cfg.num_heads * cfg.head_dim


def recompute_loop(graphdef, state, tokens, lengths, gen_len):
  """Greedy decoding without a cache: a full forward of the fixed-width buffer per token."""

  def body(i, carry):
    buf, pos = carry
    b, w = buf.shape
    positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
    logits, _ = qwen3.apply(graphdef, state, buf, positions)
    nxt = jnp.argmax(jnp.take_along_axis(logits, (pos - 1)[:, None, None], axis=1)[:, 0], -1)
    buf = buf.at[jnp.arange(b), pos].set(nxt.astype(jnp.int32))
    return buf, pos + 1

  buf, _ = jax.lax.fori_loop(0, gen_len, body, (tokens, lengths))
  return buf


def bench_sampling(model, batch, prompt_len, gen_len):
  """Tokens/s of prefill, cached decode and the no-cache recompute loop at one batch size."""
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(batch)
  prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  cache_len = prompt_len + gen_len
  params = sampler.SamplingParams(max_new_tokens=gen_len, greedy=True)
  key = jax.random.key(0)

  def run_prefill():
    return sampler.prefill(graphdef, state, prompts, lengths, cache_len=cache_len)

  # The first call compiles; the median hides it.
  t_prefill, _ = common.timed(run_prefill, FLAGS.reps + 1)
  decode = functools.partial(sampler.decode, graphdef, state, params=params)
  jax.block_until_ready(decode(*run_prefill(), lengths, key, None))  # compile
  t_decode, (out, _, _) = common.timed(
      lambda logits, cache: decode(logits, cache, lengths, key, None), FLAGS.reps, run_prefill)
  assert int(out.lengths.min()) == gen_len

  width = prompt_len + gen_len
  buf = jnp.zeros((batch, width), jnp.int32).at[:, :prompt_len].set(prompts)
  recompute = jax.jit(recompute_loop, static_argnums=(0, 4)).lower(
      graphdef, state, buf, lengths, gen_len).compile()
  t_recompute, ref = common.timed(lambda: recompute(state, buf, lengths), FLAGS.recompute_reps)
  # Same greedy tokens up to float rounding: report the agreement rather than assert it.
  agree = float(np.mean(np.asarray(ref[:, prompt_len:]) == np.asarray(out.tokens)))
  return {
      "batch": batch,
      "prefill_tok_s": batch * prompt_len / t_prefill,
      "decode_tok_s": batch * gen_len / t_decode,
      "recompute_tok_s": batch * gen_len / t_recompute,
      "agree": agree,
  }


def bench_train(model, batch, seq, steps):
  """Tokens/s and FLOP/s of a jitted AdamW step of next-token cross-entropy."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optax.adamw(1e-4)
  opt_state = opt.init(params)

  def step(params, opt_state, tokens):
    def loss_fn(p):
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
      logits, _ = nnx.merge(graphdef, p, rest)(tokens, positions)
      logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (batch, seq)),
                       jnp.int32)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile()
  params, opt_state, loss0 = compiled(params, opt_state, tokens)  # warm up
  jax.block_until_ready(loss0)
  start = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = compiled(params, opt_state, tokens)
  jax.block_until_ready(loss)
  seconds = (time.perf_counter() - start) / steps
  flops = 3 * forward_flops_per_token(model.cfg, seq) * batch * seq
  return {"tok_s": batch * seq / seconds, "flops": flops / seconds, "step_s": seconds,
          "loss_drop": float(loss0) - float(loss)}


def main(argv):
  del argv
  on_cpu = jax.devices()[0].platform == "cpu"
  dtype = FLAGS.dtype if FLAGS.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
  cfg = qwen3.get_model_config(FLAGS.preset, dtype=dtype)
  model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
  machine = common.machine_description()
  print(f"# {machine}; preset {FLAGS.preset}, compute {dtype}", flush=True)

  peak = common.matmul_peak(FLAGS.matmul_size, jnp.dtype(dtype))
  print(f"matmul peak ({FLAGS.matmul_size}^3, {dtype}): {peak / 1e9:.1f} GFLOP/s", flush=True)
  rows = []
  for b in [int(x) for x in FLAGS.batch_sizes]:
    r = bench_sampling(model, b, FLAGS.prompt_len, FLAGS.gen_len)
    print(r, flush=True)
    rows.append(r)
  tr = bench_train(model, FLAGS.train_batch, FLAGS.train_seq, FLAGS.train_steps)
  print(tr, flush=True)

  n_matmul = matmul_params(cfg)
  command = " ".join(["python benchmarks/bench_model.py"] + sys.argv[1:])
  lines = [
      f"### bench_model: preset `{FLAGS.preset}` ({n_matmul / 1e6:.2f}M matmul params), "
      f"compute {dtype}",
      "",
      f"Machine: {machine}. Command: `{command}`.",
      "",
      f"Sampling: prompts of {FLAGS.prompt_len} tokens, {FLAGS.gen_len} greedy tokens per row; "
      "recompute = no KV cache, a full forward of the (prompt + generated) buffer per token.",
      "",
      "| batch | prefill tok/s | decode tok/s (KV cache) | decode tok/s (recompute) "
      "| cached / recompute | same tokens |",
      "|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(f"| {r['batch']} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | "
                 f"{r['recompute_tok_s']:,.0f} | {r['decode_tok_s'] / r['recompute_tok_s']:.1f}x "
                 f"| {r['agree']:.0%} |")
  lines += [
      "",
      f"Training step (AdamW, next-token loss, batch {FLAGS.train_batch} x {FLAGS.train_seq} "
      "tokens; FLOPs = (6 N + 12 L T H D) per token, see the script's docstring):",
      "",
      "| tokens/s | step s | achieved GFLOP/s | matmul peak GFLOP/s | of peak |",
      "|---:|---:|---:|---:|---:|",
      f"| {tr['tok_s']:,.0f} | {tr['step_s']:.3f} | {tr['flops'] / 1e9:,.1f} | "
      f"{peak / 1e9:,.1f} | {tr['flops'] / peak:.0%} |",
      "",
  ]
  table = "\n".join(lines)
  print("\n" + table)
  if FLAGS.write:
    common.append_section(table, FLAGS.out)

if __name__ == "__main__":
  app.run(main)
