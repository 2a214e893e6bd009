"""Tokens/s and MFU of the generic trainer's jitted step (demo model, packed rows, AdamW).

  python benchmarks/bench_train.py [--steps 5] [--seq_len 256] [--batch 8] [--micro 1]

MFU = model FLOPs of the step (gr2_jax.train.metrics_log.model_flops_per_token: projections,
LM head and full [T, T] attention, x3 for forward + backward) / step time / the measured f32
matmul peak of this machine. Appends a section to BENCHMARKS.md.
"""

import argparse
import time

import jax
import numpy as np

import common
from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.train import metrics_log
from gr2_jax.train import optim
from gr2_jax.train import packing
from gr2_jax.train import trainer as trainer_lib


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--micro", type=int, default=1)
  p.add_argument("--vocab", type=int, default=5248)
  args = p.parse_args()
  cfg = qwen3.get_model_config("demo", vocab_size=args.vocab)
  mesh = mesh_lib.single_device_mesh()
  model = mesh_lib.create_sharded_model(cfg, mesh)
  rng = np.random.default_rng(0)
  ex = [(rng.integers(0, args.vocab, int(n)), np.ones(int(n), np.float32))
        for n in rng.integers(20, 120, 4000)]
  rows = packing.pack(ex, args.seq_len)
  ocfg = optim.OptimConfig(learning_rate=1e-3, total_steps=100)
  tr = trainer_lib.Trainer(model, ocfg, trainer_lib.TrainerConfig(num_steps=1), mesh=mesh,
                           workdir="/tmp/bench_train")
  ds = trainer_lib.batch_dataset(rows, args.batch, args.micro)
  state = tr.init_state()
  batches = [ds[i] for i in range(args.steps + 1)]
  dev = [{k: jax.device_put(b[k]) for k in trainer_lib.DEVICE_FIELDS} for b in batches]
  state, m = tr._step(state, dev[0])  # pylint: disable=protected-access
  jax.block_until_ready(m)
  start = time.perf_counter()
  for b in dev[1:]:
    state, m = tr._step(state, b)  # pylint: disable=protected-access
  jax.block_until_ready(m)
  dt = (time.perf_counter() - start) / args.steps
  real = np.mean([(b["segment_ids"] > 0).sum() for b in batches[1:]])
  computed = args.micro * args.batch * args.seq_len
  flops = metrics_log.model_flops_per_token(cfg, args.seq_len) * computed
  peak = metrics_log.measure_peak_flops()
  total, non_emb = qwen3.param_counts(model)
  lines = [
      f"\n### bench_train: preset `demo` ({total / 1e6:.2f}M params, {non_emb / 1e6:.2f}M "
      f"non-embedding, vocab {args.vocab}), float32",
      "",
      f"Machine: {common.machine_description()}. "
      f"Command: `python benchmarks/bench_train.py --seq_len {args.seq_len} --batch "
      f"{args.batch} --micro {args.micro}`.",
      "",
      "| micro x batch x seq | real tok/s | step s | model GFLOP/s | matmul peak GFLOP/s | MFU |",
      "|---|---:|---:|---:|---:|---:|",
      f"| {args.micro} x {args.batch} x {args.seq_len} | {real / dt:,.0f} | {dt:.3f} | "
      f"{flops / dt / 1e9:.1f} | {peak / 1e9:.1f} | {100 * flops / dt / peak:.1f}% |",
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  common.append_section(text)

if __name__ == "__main__":
  main()
