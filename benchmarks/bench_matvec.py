"""How close XLA's own matrix-vector products get to the memory-bandwidth bound of batch-1
decoding, on a model preset's shapes (default smollm2-135m), without the rest of the decoder.

Batch-1 decoding reads every weight once per token, so its bound is weight bytes / copy
bandwidth (`common.copy_bandwidth`, measured in the same run). This script times, float32:
each weight shape's [1, d] x [d, n] product alone (achieved GB/s), and a chain of the preset's
layers (q, k, v, o, gate, up, down matvecs with distinct random weights per layer, one jit) plus
the LM head, i.e. the decode step's weight traffic and nothing else (no attention, norms, RoPE,
sampling or loop). The chain's tokens/s is an upper bound for a decoder built from XLA's dots on
this machine.

  python benchmarks/bench_matvec.py [--preset=smollm2-135m] [--reps=20] [--append]
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import common
from gr2_jax.models import qwen3

flags.DEFINE_string("preset", "smollm2-135m", "Model preset whose shapes are timed.")
flags.DEFINE_integer("reps", 20, "Timed repetitions of the layer chain.")
flags.DEFINE_integer("copy_mb", 512, "Size of the array whose copy measures the bandwidth.")
flags.DEFINE_bool("append", False, "Append the results to BENCHMARKS.md.")
FLAGS = flags.FLAGS


def layer_shapes(cfg):
  d, q, kv, m = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
      cfg.mlp_dim
  return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, m), "up": (d, m),
          "down": (m, d)}


def time_call(f, *args, reps):
  jax.block_until_ready(f(*args))
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps


def main(argv):
  del argv
  cfg = qwen3.get_model_config(FLAGS.preset)
  rng = np.random.default_rng(0)
  shapes = layer_shapes(cfg)
  bandwidth = common.copy_bandwidth(FLAGS.copy_mb << 20)
  rows = []
  dot = jax.jit(lambda x, w: x @ w)
  for name, (k, n) in list(shapes.items()) + [("lm_head", (cfg.hidden_size, cfg.vocab_size))]:
    w = jnp.asarray(rng.standard_normal((k, n), np.float32))
    x = jnp.asarray(rng.standard_normal((1, k), np.float32))
    dt = time_call(dot, x, w, reps=200 if k * n < 4_000_000 else 30)
    rows.append((name, k, n, dt, k * n * 4 / dt))
  layers = [{n: jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for n, s in shapes.items()}
            for _ in range(cfg.num_layers)]
  head = jnp.asarray(rng.standard_normal((cfg.hidden_size, cfg.vocab_size), np.float32) * 0.02)

  @jax.jit
  def chain(x, layers, head):
    for w in layers:
      q = x @ w["q"]
      kv = (x @ w["k"]).sum() + (x @ w["v"]).sum()  # read, as attention would
      h = x + q @ w["o"]
      x = h + (jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"] + 0.0 * kv
    return x @ head

  x = jnp.ones((1, cfg.hidden_size), jnp.float32)
  dt = time_call(chain, x, layers, head, reps=FLAGS.reps)
  weight_bytes = 4 * (sum(int(np.prod(s)) for s in shapes.values()) * cfg.num_layers
                      + cfg.hidden_size * cfg.vocab_size)
  bound = bandwidth / weight_bytes
  lines = [f"### bench_matvec: XLA matvecs against the batch-1 bandwidth bound, `{FLAGS.preset}` "
           f"({common.machine_description()})", "",
           f"`python benchmarks/bench_matvec.py --preset={FLAGS.preset}`. Copy bandwidth "
           f"{bandwidth / 1e9:.1f} GB/s (read + written); float32 weights read per token "
           f"{weight_bytes / 1e6:.0f} MB; bound {bound:.1f} tokens/s.", "",
           "| product | shape | us | GB/s |", "|---|---|---:|---:|"]
  lines += [f"| {n} | [1, {k}] x [{k}, {m}] | {dt_ * 1e6:.0f} | {bw / 1e9:.1f} |"
            for n, k, m, dt_, bw in rows]
  lines += ["", f"The {cfg.num_layers} layers' matvecs and the LM head in one jit (distinct "
                f"weights per layer): {dt * 1e3:.2f} ms per token, {weight_bytes / dt / 1e9:.1f} "
                f"GB/s, {1 / dt:.1f} tokens/s = {100 / dt / bound:.0f}% of the bound."]
  text = "\n".join(lines)
  print(text)
  if FLAGS.append:
    common.append_section(text)


if __name__ == "__main__":
  app.run(main)
