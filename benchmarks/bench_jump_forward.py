"""Jump-forward decoding of the reasoning-free ranking list: seconds per batch with and without.

  python benchmarks/bench_jump_forward.py --workdir=W [--model_dir=W/internalize/latest]
      [--slates 96] [--batches 8,48] [--jumps 0,8,16] [--reps 3]

The model's reasoning-free prompt (the answer's head prefilled) on `slates` seeded test slates;
the list decoded under the strict list constraint (`rerank.evaluate.list_ranking_constraint`),
greedy (the serving path) and sampled at temperature 1 (the internalize stage's rollouts), at
each batch size and jump-forward width (0 = one model call per token). Prints and appends the
median seconds per batch (after a compiling pass), answer tokens, decode steps saved, and
whether the greedy answers equal the step-by-step ones.
"""

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np

import common
from gr2_jax.data import artifacts
from gr2_jax.data import slates as slates_lib
from gr2_jax.models import artifact as model_artifact
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.sampling import sampler
from gr2_jax.teachers import base
from gr2_jax.text import chat
from gr2_jax.text import tokenizers


def run(model, tok, prompts, shown, fmt, batch, jump, greedy, reps):
  """(median seconds per batch, answers of the last rep, mean answer tokens)."""
  make_constraint, budget = rerank_lib.list_ranking_constraint(
      tok, model.cfg.vocab_size, shown, fmt, batch)
  stops = chat.chat_stop_ids(tok)
  n = len(prompts) // batch * batch
  times, answers, lengths = [], [], []
  for rep in range(reps + 1):  # the first pass compiles
    answers, lengths, secs = [], [], []
    for s in range(0, n, batch):
      t0 = time.perf_counter()
      out = sampler.sample(model, prompts[s:s + batch], key=jax.random.key(rep * 7919 + s),
                           max_new_tokens=budget, greedy=greedy, stop_tokens=stops,
                           pad_id=tok.pad_id, constraint=make_constraint(s, batch),
                           prompt_multiple=rerank_lib.PROMPT_MULTIPLE,
                           vocab_limit=tok.vocab_size, jump_forward=jump,
                           forced_logprobs=not greedy)
      toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
      secs.append(time.perf_counter() - t0)
      answers += [toks[j, :lens[j]].tolist() for j in range(batch)]
      lengths += lens.tolist()
    if rep:
      times.append(float(np.median(secs)))
  return float(np.median(times)), answers, float(np.mean(lengths))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--model_dir", default=None)
  p.add_argument("--slates", type=int, default=96)
  p.add_argument("--batches", default="8,48")
  p.add_argument("--jumps", default="0,8,16")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--no_append", action="store_true")
  args = p.parse_args()
  machine = common.machine_description()
  model_dir = args.model_dir or os.path.join(args.workdir, "internalize", "latest")
  model = model_artifact.load_model(model_dir)
  tok = tokenizers.load_tokenizer(os.path.join(model_dir, "tokenizer"))
  prompt_cfg, sids = rerank_lib.load_rerank_info(model_dir)
  cfg = dataclasses.replace(prompt_cfg, reasoning=False, answer_head=True)
  items = artifacts.load_items(os.path.join(args.workdir, "data", "latest"))
  s = slates_lib.load_split(os.path.join(args.workdir, "legacy", "latest"), "test",
                            max_examples=args.slates, seed=0)
  examples = base.examples_from_slates(s)
  prompts = rerank_lib.prompt_ids(examples, items, sids, cfg, tok)
  shown = [[sids[int(x)] for x in ex.slate] for ex in examples]
  rows = []
  for batch in (int(b) for b in args.batches.split(",")):
    for greedy in (True, False):
      ref = None
      for jump in (int(j) for j in args.jumps.split(",")):
        secs, answers, tokens = run(model, tok, prompts, shown, cfg.answer_format, batch, jump,
                                    greedy, args.reps)
        if jump == 0:
          ref = answers
        row = {"batch": batch, "mode": "greedy" if greedy else "sampled", "jump": jump,
               "seconds_per_batch": secs, "answer_tokens": tokens,
               "same_as_step_by_step": (answers == ref) if greedy and ref is not None else None}
        print(json.dumps(row), flush=True)
        rows.append(row)
  if not args.no_append:
    common.append_section(markdown(rows, machine, model_dir, args))


def markdown(rows, machine, model_dir, args):
  lines = [f"### bench_jump_forward: `{os.path.relpath(model_dir, args.workdir)}`", "",
           f"Machine: {machine}. Command: `python benchmarks/bench_jump_forward.py --workdir=W "
           f"--slates {args.slates} --batches {args.batches} --jumps {args.jumps} --reps "
           f"{args.reps}`: the reasoning-free list under the strict list constraint, median "
           "seconds per batch after a compiling pass.", "",
           "| batch | decoding | jump-forward | s per batch | answer tokens | speed-up | same "
           "answers as step by step |", "|---|---|---|---|---|---|---|"]
  base_secs = {}
  for r in rows:
    key = (r["batch"], r["mode"])
    if r["jump"] == 0:
      base_secs[key] = r["seconds_per_batch"]
    speed = base_secs.get(key, float("nan")) / r["seconds_per_batch"]
    same = {None: "-", True: "yes", False: "no"}[r["same_as_step_by_step"]]
    lines.append(f"| {r['batch']} | {r['mode']} | {r['jump'] or 'off'} | "
                 f"{r['seconds_per_batch']:.3f} | {r['answer_tokens']:.1f} | {speed:.2f}x | "
                 f"{same} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
