"""The model runtime's numerics: float32 vs bfloat16 compute (float32 master weights), with and
without remat, and bfloat16 parameters, measured through `gr2_jax.parallel.runtime` on the
project's own training step (`train.trainer`: chunked loss, AdamW, clipping) and sampler.

Each variant runs in a fresh process, so its peak device memory is its own (GPU/TPU; the CPU
reports none). Per variant: training tokens/s and step seconds, the first step's loss (the
same weights and batch in every variant: its difference from float32 is the numerics' error),
greedy decode tokens/s with the KV cache, and the share of greedy tokens equal to float32's.

  python benchmarks/bench_runtime.py                       # demo preset, CPU-sized
  python benchmarks/bench_runtime.py --preset=qwen3-0.6b --train_batch=8 --train_seq=1024 \
      --decode_batch=64 --prompt_len=256 --gen_len=128     # a GPU
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "demo", "Model preset of gr2_jax.models.qwen3 (random weights).")
flags.DEFINE_list("variants", ["f32", "bf16", "bf16_remat", "bf16_params"],
                  "Numerics to compare (see VARIANTS).")
flags.DEFINE_string("mesh", "-1,1,1", "runtime.mesh over this machine's devices.")
flags.DEFINE_integer("train_batch", 4, "Sequences per training step.")
flags.DEFINE_integer("train_seq", 256, "Tokens per sequence.")
flags.DEFINE_integer("train_steps", 5, "Timed training steps (after one that compiles).")
flags.DEFINE_integer("decode_batch", 8, "Rows decoded together.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
flags.DEFINE_integer("gen_len", 32, "Greedy tokens per row.")
flags.DEFINE_string("variant", "", "Internal: run one variant and print its JSON.")
flags.DEFINE_string("out", common.BENCHMARKS_MD, "Markdown file the results are appended to.")
flags.DEFINE_bool("write", True, "Append the results to --out.")

VARIANTS = {
    "f32": dict(dtype="float32", param_dtype="float32", remat=False),
    "bf16": dict(dtype="bfloat16", param_dtype="float32", remat=False),
    "bf16_remat": dict(dtype="bfloat16", param_dtype="float32", remat=True),
    "bf16_params": dict(dtype="bfloat16", param_dtype="bfloat16", remat=False),
}


def _peak_bytes():
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def run_variant(name):
  """One variant in this process: a dict of its measurements."""
  from gr2_jax.models import qwen3  # pylint: disable=g-import-not-at-top
  from gr2_jax.parallel import runtime  # pylint: disable=g-import-not-at-top
  from gr2_jax.sampling import sampler  # pylint: disable=g-import-not-at-top
  from gr2_jax.train import optim  # pylint: disable=g-import-not-at-top
  from gr2_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  section = runtime.section()
  section.mesh = tuple(int(x) for x in FLAGS.mesh.split(","))
  for k, v in VARIANTS[name].items():
    section[k] = v
  rt = runtime.for_devices(section, devices=jax.local_devices())
  cfg = qwen3.get_model_config(FLAGS.preset)
  rng = np.random.default_rng(0)
  out = {"variant": name, **VARIANTS[name]}
  with rt.activate():
    model = rt.init_model(cfg, seed=0)
    b, t = FLAGS.train_batch, FLAGS.train_seq
    tokens = rng.integers(0, cfg.vocab_size, (1, b, t + 1)).astype(np.int32)
    batch = {"tokens": tokens[..., :-1], "targets": tokens[..., 1:],
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)).copy(),
             "segment_ids": np.ones((1, b, t), np.int32),
             "weights": np.ones((1, b, t), np.float32)}
    ocfg = optim.OptimConfig(learning_rate=1e-5, warmup_steps=0, total_steps=1000)
    with tempfile.TemporaryDirectory() as tmp:
      tr = trainer_lib.Trainer(model, ocfg, trainer_lib.TrainerConfig(num_steps=1000),
                               mesh=rt.mesh, rules=rt.rules, workdir=tmp)
      state = tr.init_state()
      dev = {k: jax.device_put(v, tr._batch_sharding(v.shape))  # pylint: disable=protected-access
             for k, v in batch.items()}
      t0 = time.perf_counter()
      state, m = tr._step(state, dev)  # pylint: disable=protected-access
      out["first_loss"] = float(m["loss"])
      out["compile_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      for _ in range(FLAGS.train_steps):
        state, m = tr._step(state, dev)  # pylint: disable=protected-access
      jax.block_until_ready(m)
      step_s = (time.perf_counter() - t0) / FLAGS.train_steps
      out.update(train_step_s=step_s, train_tok_s=b * t / step_s)
      model = tr.model(state["params"])
    prompts = rng.integers(0, cfg.vocab_size, (FLAGS.decode_batch, FLAGS.prompt_len)).tolist()
    kw = dict(key=jax.random.key(0), max_new_tokens=FLAGS.gen_len, greedy=True)
    sampler.sample(model, prompts, **kw)  # compiles
    t0 = time.perf_counter()
    res = sampler.sample(model, prompts, **kw)
    jax.block_until_ready(res.tokens)
    dt = time.perf_counter() - t0
    out["decode_tok_s"] = FLAGS.decode_batch * FLAGS.gen_len / dt
    out["greedy_tokens"] = np.asarray(res.tokens).tolist()
  out["peak_bytes"] = _peak_bytes()
  return out


def main(argv):
  del argv
  if FLAGS.variant:
    print("RESULT " + json.dumps(run_variant(FLAGS.variant)), flush=True)
    return
  results = []
  for name in FLAGS.variants:
    if name not in VARIANTS:
      raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    args = [a for a in sys.argv[1:] if not a.startswith("--variants")]
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--variant={name}",
                           "--nowrite"] + args, capture_output=True, text=True, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
      print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
      raise SystemExit(f"variant {name} failed")
    results.append(json.loads(line[len("RESULT "):]))
    r = results[-1]
    print(f"{name}: train {r['train_tok_s']:,.0f} tok/s, decode {r['decode_tok_s']:,.0f} tok/s,"
          f" loss {r['first_loss']:.5f}, peak {r['peak_bytes']}", flush=True)
  ref = next((r for r in results if r["variant"] == "f32"), results[0])
  machine = common.machine_description()
  command = " ".join(["python benchmarks/bench_runtime.py"] + sys.argv[1:])
  lines = [
      f"### bench_runtime: numerics of preset `{FLAGS.preset}` through the runtime, mesh "
      f"({FLAGS.mesh})", "",
      f"Machine: {machine}. Command: `{command}`.", "",
      f"Training step: batch {FLAGS.train_batch} x {FLAGS.train_seq} tokens (the project's "
      f"trainer step); decode: {FLAGS.decode_batch} rows, {FLAGS.prompt_len}-token prompts, "
      f"{FLAGS.gen_len} greedy tokens. First-step loss on the same weights and batch; greedy "
      f"agreement = share of the greedy tokens equal to float32's.", "",
      "| variant | compute | params | remat | train tok/s | step s | vs f32 | first loss "
      "| loss - f32 | decode tok/s | greedy agreement | peak device memory |",
      "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    agree = float(np.mean(np.asarray(r["greedy_tokens"]) == np.asarray(ref["greedy_tokens"])))
    peak = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else "n/a"
    lines.append(
        f"| {r['variant']} | {r['dtype']} | {r['param_dtype']} | {'yes' if r['remat'] else 'no'}"
        f" | {r['train_tok_s']:,.0f} | {r['train_step_s']:.3f} | "
        f"{r['train_tok_s'] / ref['train_tok_s']:.2f}x | {r['first_loss']:.5f} | "
        f"{r['first_loss'] - ref['first_loss']:+.5f} | {r['decode_tok_s']:,.0f} | {agree:.0%} | "
        f"{peak} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if FLAGS.write:
    common.append_section(text, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
