"""Rollout tokens/s and RL step time of the rl stage's pieces (demo model, random weights).

  python benchmarks/bench_rl.py [--rows 64] [--prompt_len 384] [--new_tokens 256]
      [--update_rows 24] [--dtype float32|bfloat16]

Rollout: one `sampler.sample` call at temperature 1 over `rows` prompts of `prompt_len` tokens
generating exactly `new_tokens` each (no stop token: the worst case), timed after a compiling
call; tokens/s counts generated tokens. RL step: the jitted PPO-clip (DAPO settings) update of
`learner.make_rl_step` on `update_rows` rows of prompt + response width, timed after a
compiling call. Appends a section to BENCHMARKS.md.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.rl import learner
from gr2_jax.sampling import sampler
from gr2_jax.train import optim
from gr2_jax.train import trainer as trainer_lib


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=64)
  p.add_argument("--prompt_len", type=int, default=384)
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--update_rows", type=int, default=24)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args()
  cfg = qwen3.get_model_config("demo", vocab_size=args.vocab, dtype=args.dtype)
  mesh = mesh_lib.make_mesh((len(jax.devices()), 1, 1))
  model = mesh_lib.create_sharded_model(cfg, mesh)
  rng = np.random.default_rng(0)
  prompts = rng.integers(10, args.vocab, (args.rows, args.prompt_len)).astype(np.int32)

  def roll(seed):
    out = sampler.sample(model, prompts, lengths=np.full(args.rows, args.prompt_len),
                         key=jax.random.key(seed), max_new_tokens=args.new_tokens)
    jax.block_until_ready(out.tokens)
    return out

  out = roll(0)
  start = time.perf_counter()
  for r in range(args.repeats):
    out = roll(r + 1)
  t_roll = (time.perf_counter() - start) / args.repeats
  gen = args.rows * args.new_tokens

  n = args.update_rows
  toks, lps = np.asarray(out.tokens), np.asarray(out.logprobs)
  rows = learner.build_rows([prompts[i % args.rows].tolist() for i in range(n)],
                            [toks[i % args.rows].tolist() for i in range(n)],
                            [lps[i % args.rows] for i in range(n)],
                            args.prompt_len + args.new_tokens, 0)
  rows["advantages"] = rng.standard_normal(n).astype(np.float32)
  ocfg = optim.OptimConfig(learning_rate=1e-4, total_steps=100)
  tr = trainer_lib.Trainer(model, ocfg, trainer_lib.TrainerConfig(num_steps=1), mesh=mesh,
                           workdir="/tmp/bench_rl")
  step = jax.jit(learner.make_rl_step(tr.graphdef, tr.tx, tr.schedule, learner.LossConfig()),
                 donate_argnums=0)
  state = tr.init_state()
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  state, m = step(state, batch)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(args.repeats):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t_step = (time.perf_counter() - start) / args.repeats
  width = args.prompt_len + args.new_tokens
  total, _ = qwen3.param_counts(model)
  lines = [
      f"\n### bench_rl: preset `demo` ({total / 1e6:.2f}M params, vocab {args.vocab}), "
      f"{args.dtype}",
      "",
      f"Machine: {common.machine_description()}. Command: `python benchmarks/bench_rl.py --rows "
      f"{args.rows} --prompt_len {args.prompt_len} --new_tokens {args.new_tokens} "
      f"--update_rows {args.update_rows} --dtype {args.dtype}`.",
      "",
      "| rollout rows x (prompt + new) | rollout s | generated tok/s | update rows x width | "
      "RL step s | update tok/s |",
      "|---|---:|---:|---|---:|---:|",
      f"| {args.rows} x ({args.prompt_len} + {args.new_tokens}) | {t_roll:.2f} | "
      f"{gen / t_roll:,.0f} | {n} x {width} | {t_step:.2f} | {n * width / t_step:,.0f} |",
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  common.append_section(text)

if __name__ == "__main__":
  main()
