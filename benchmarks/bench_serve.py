"""Serving: candidate-prefix KV reuse, and the HTTP server under loopback load.

  python benchmarks/bench_serve.py --workdir=W [--seconds 60] [--clients 1,8,32]
      [--slates 4] [--users 16] [--max_batch 8] [--jump_forward 8] [--rounds 3]
      [--prefix_batch N]  # --clients= (empty) skips the load test

Start-up: the time `python -m gr2_jax.serve` takes before its port opens (load the workdir's
model artifact, compile the re-ranking path for every batch size).

Prefix reuse: `slates` test slates each shown to `users` users (their own histories), prompts
in the part order "system_candidates_user" so that the system turn and the candidates form the
shared prefix; batches of `max_batch` requests of one slate; requests/s of the reasoning-free
re-ranking path and time to first token (prefill and one decode step per batch) with the
prefix cache on and off: after a compiling pass of each, `--rounds` rounds that each time one
pass with the cache off and one with it on (the prefix cache emptied before each pass, so a pass
prefills each slate's prefix once); medians over the rounds. The rankings of both must be
identical. With jump-forward on (the default), the same again without it (one model call per
answer token). `--prefix_batch` sets the batch of this part (default `--max_batch`).

Load: the server (the checkpoint's own prompt) on 127.0.0.1 in this process; for each client
count, closed-loop clients send test-slate requests for `seconds`; latency percentiles,
requests/s, errors, lost and mixed-up answers. Appends a section to BENCHMARKS.md.
"""

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np

import common
from gr2_jax.data import slates as slates_lib
from gr2_jax.sampling import sampler
from gr2_jax.serve import app as app_lib
from gr2_jax.serve import engine as engine_lib
from gr2_jax.serve import loadtest


def test_requests(workdir, n, seed=0):
  """`n` re-ranking requests (history, candidates) of seeded test slates."""
  legacy = os.path.join(workdir, "legacy", "latest")
  s = slates_lib.load_split(legacy, "test", max_examples=n, seed=seed)
  out = []
  for hist, slate in zip(s["history"], s["slate"]):
    out.append({"history": [int(x) for x in hist if x >= 0], "candidates": [int(x) for x in slate]})
  return out


def prefix_bench(engine, requests, n_slates, n_users, max_batch, rounds=3):
  """Requests/s and time to first token with the prefix cache on and off, with the engine's
  jump-forward and (`no_jump`) without it."""
  base = engine.cfg
  out = prefix_bench_one(engine, requests, n_slates, n_users, max_batch, rounds)
  if base.jump_forward:
    engine.cfg = dataclasses.replace(base, jump_forward=0)
    out["no_jump"] = prefix_bench_one(engine, requests, n_slates, n_users, max_batch, rounds)
    engine.cfg = base
    out["same_rankings_jump"] = out["rankings"] == out["no_jump"]["rankings"]
    out["jump_speedup"] = out["off"]["requests_per_s"] / out["no_jump"]["off"]["requests_per_s"]
    out["no_jump"].pop("rankings")
  out.pop("rankings")
  out["jump_forward"] = base.jump_forward
  return out


def prefix_bench_one(engine, requests, n_slates, n_users, max_batch, rounds=3):
  """Requests/s and time to first token with the prefix cache on and off: a compiling pass of
  each, then `rounds` rounds that each time one pass with the cache off and one with it on
  (interleaved, so that a change of machine load hits both); the medians over the rounds."""
  rng = np.random.default_rng(0)
  slates = [requests[i]["candidates"] for i in range(n_slates)]
  histories = [requests[i]["history"] for i in rng.choice(len(requests), n_users, replace=False)]
  prompt = engine.prompt
  engine.prompt = {k: dataclasses.replace(v, part_order="system_candidates_user")
                   for k, v in engine.prompt.items()}
  batches = []
  for slate in slates:
    reqs = [{"history": h, "candidates": slate, "user": None, "explain": False}
            for h in histories]
    batches += [reqs[i:i + max_batch] for i in range(0, len(reqs), max_batch)]
  cache = engine.prefix_cache

  def one_pass(mode):
    engine.prefix_cache = cache if mode == "on" else None
    if cache is not None:
      cache._entries.clear()  # pylint: disable=protected-access
    t0 = time.perf_counter()
    got = [a["ranking"] for b in batches for a in engine.rerank_batch(b)]
    return got, time.perf_counter() - t0

  def ttft_pass(mode):
    """Time to first token: the prefill and one greedy step, per batch."""
    if cache is not None:
      cache._entries.clear()  # pylint: disable=protected-access
    ttft = []
    for b in batches:
      built = [engine.rerank_prompt(r["history"], r["candidates"], None, False) for r in b]
      ids = [x[0] for x in built]
      kw = ({"prefix_cache": cache, "prefix_lengths": [x[1] for x in built]}
            if mode == "on" else {})
      t0 = time.perf_counter()
      res = sampler.sample(engine.model, ids, key=jax.random.key(0), max_new_tokens=1,
                           greedy=True, pad_id=engine.tok.pad_id,
                           prompt_multiple=engine.cfg.prompt_multiple, **kw)
      jax.block_until_ready(res.tokens)
      ttft.append(time.perf_counter() - t0)
    return ttft

  rankings = {}
  for mode in ("off", "on"):  # compiling passes
    rankings[mode], _ = one_pass(mode)
    ttft_pass(mode)
  secs = {"off": [], "on": []}
  ttfts = {"off": [], "on": []}
  for _ in range(rounds):
    for mode in ("off", "on"):
      got, t = one_pass(mode)
      if got != rankings[mode]:
        raise RuntimeError(f"prefix cache {mode}: the rankings changed between passes")
      secs[mode].append(t)
      ttfts[mode] += ttft_pass(mode)
  built = engine.rerank_prompt(batches[0][0]["history"], batches[0][0]["candidates"], None,
                               False)
  engine.prefix_cache = cache
  engine.prompt = prompt
  n = len(rankings["on"])
  out = {}
  for mode in ("off", "on"):
    out[mode] = {"requests": n, "seconds": float(np.median(secs[mode])),
                 "requests_per_s": n / float(np.median(secs[mode])),
                 "requests_per_s_rounds": [n / t for t in secs[mode]],
                 "ttft_batch_ms_median": 1000 * float(np.median(ttfts[mode])),
                 "prompt_tokens": len(built[0]), "prefix_tokens": built[1]}
  out["rounds"] = rounds
  out["rankings"] = rankings["on"]
  out["same_rankings"] = rankings["on"] == rankings["off"]
  out["speedup"] = out["on"]["requests_per_s"] / out["off"]["requests_per_s"]
  out["speedup_rounds"] = [a / b for a, b in zip(out["on"]["requests_per_s_rounds"],
                                                 out["off"]["requests_per_s_rounds"])]
  out["ttft_speedup"] = out["off"]["ttft_batch_ms_median"] / out["on"]["ttft_batch_ms_median"]
  return out


def main():
  p = argparse.ArgumentParser()
  defaults = engine_lib.ServeConfig()
  p.add_argument("--workdir", required=True)
  p.add_argument("--model_dir", default=None)
  p.add_argument("--seconds", type=float, default=60.0)
  p.add_argument("--clients", default="1,8,32")
  p.add_argument("--slates", type=int, default=4)
  p.add_argument("--users", type=int, default=16)
  p.add_argument("--max_batch", type=int, default=defaults.max_batch)
  p.add_argument("--max_wait_ms", type=float, default=defaults.max_wait_ms)
  p.add_argument("--jump_forward", type=int, default=defaults.jump_forward,
                 help="0: one token per decode step")
  p.add_argument("--rounds", type=int, default=3, help="interleaved off/on prefix rounds")
  p.add_argument("--prefix_batch", type=int, default=None,
                 help="batch of the prefix-reuse part (default: --max_batch)")
  p.add_argument("--out", default=None, help="also write the results as JSON here")
  p.add_argument("--no_append", action="store_true")
  args = p.parse_args()
  machine = common.machine_description()
  t0 = time.time()
  model_dir = args.model_dir or engine_lib.find_model_dir(args.workdir)
  k = engine_lib.slate_size(args.workdir) or 10
  cfg = engine_lib.ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                               max_candidates=k, jump_forward=args.jump_forward)
  engine = engine_lib.Engine.from_dirs(model_dir, os.path.join(args.workdir, "data", "latest"),
                                       cfg)
  load_s = time.time() - t0
  warm_s = engine.warmup()
  startup = {"load_s": load_s, "warmup_s": warm_s, "startup_s": time.time() - t0}
  print("start-up", json.dumps(startup), flush=True)
  requests = test_requests(args.workdir, 512)
  results = {"model_dir": model_dir, "startup": startup, "machine": machine}
  # The load test first, with the checkpoint's own prompt.
  api = app_lib.create_app(engine, cfg)
  rows = []
  with loadtest.ServerThread(api) as srv:
    for clients in (int(c) for c in args.clients.split(",") if c.strip()):
      def make_request(client, n, clients=clients):
        return requests[(client * 997 + n * 31) % len(requests)]
      before = json_get(srv.url + "/healthz")["batcher"]
      res = loadtest.load_test(srv.url, make_request, clients=clients, seconds=args.seconds)
      after = json_get(srv.url + "/healthz")["batcher"]
      # Requests per sampler call in this run, from the server's own counters.
      res["mean_batch"] = ((after.get("done", 0) - before.get("done", 0))
                           / max(after.get("batches", 0) - before.get("batches", 0), 1))
      print("load", json.dumps(res), flush=True)
      rows.append(res)
    health = json_get(srv.url + "/healthz")
  results["load"] = rows
  results["server_counters"] = health
  prefix_batch = args.prefix_batch or args.max_batch
  if prefix_batch > args.max_batch:
    # The engine pads a batch to a bucket of at most max_batch; a larger one needs its own.
    engine.cfg = dataclasses.replace(engine.cfg, max_batch=prefix_batch)
  results["prefix_batch"] = prefix_batch
  results["prefix"] = prefix_bench(engine, requests, args.slates, args.users, prefix_batch,
                                   args.rounds)
  print("prefix", json.dumps(results["prefix"]), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  if not args.no_append:
    common.append_section(markdown(results, args))


def json_get(url):
  import httpx  # pylint: disable=import-outside-toplevel
  return httpx.get(url).json()


def markdown(r, args):
  pre = r["prefix"]
  lines = [
      f"### bench_serve: `{os.path.relpath(r['model_dir'], args.workdir)}`", "",
      f"Machine: {r['machine']}. Command: `python benchmarks/bench_serve.py --workdir=W "
      + (f"--model_dir={args.model_dir} " if args.model_dir else "")
      + f"--seconds {args.seconds:g} --clients {args.clients} --max_batch {args.max_batch} "
      f"--jump_forward {args.jump_forward} --max_wait_ms {args.max_wait_ms:g} --rounds "
      f"{args.rounds}" + (f" --prefix_batch {args.prefix_batch}" if args.prefix_batch else "")
      + "`.", "",
      f"Start-up (load the model, compile every batch size): {r['startup']['startup_s']:.1f} s "
      f"(load {r['startup']['load_s']:.1f} s, compile {r['startup']['warmup_s']:.1f} s).", "",
      "| clients | seconds | answered | errors | lost | mixed up | requests/s | p50 ms | "
      "p95 ms | p99 ms | requests per batch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for x in r["load"]:
    lines.append(f"| {x['clients']} | {x['seconds']:.1f} | {x['answered']} | {x['errors']} | "
                 f"{x['lost']} | {x['mixed_up']} | {x['requests_per_s']:.2f} | "
                 f"{x['p50_ms']:.0f} | {x['p95_ms']:.0f} | {x['p99_ms']:.0f} | "
                 f"{x['mean_batch']:.2f} |")
  lines += ["", f"Prefix reuse ({args.slates} slates x {args.users} users, batches of "
            f"{r['prefix_batch']}, prompt {pre['on']['prompt_tokens']} tokens of which "
            f"{pre['on']['prefix_tokens']} shared):", "",
            "| prefix cache | requests/s | time to first token per batch (ms, median) |",
            "|---|---|---|"]
  for mode in ("off", "on"):
    lines.append(f"| {mode} | {pre[mode]['requests_per_s']:.2f} | "
                 f"{pre[mode]['ttft_batch_ms_median']:.0f} |")
  rounds = ", ".join(f"{x:.2f}" for x in pre["speedup_rounds"])
  lines += ["", f"Speed-up {pre['speedup']:.2f}x requests/s (medians of {pre['rounds']} "
            f"interleaved rounds; per round {rounds}), {pre['ttft_speedup']:.2f}x time to "
            f"first token; identical rankings: {pre['same_rankings']} (jump-forward "
            f"{pre['jump_forward']}).", ""]
  if "no_jump" in pre:
    nj = pre["no_jump"]
    lines += [f"Without jump-forward (one token per decode step): {nj['off']['requests_per_s']:.2f} "
              f"requests/s with the prefix cache off, {nj['on']['requests_per_s']:.2f} on "
              f"(speed-up {nj['speedup']:.2f}x); jump-forward's own speed-up "
              f"{pre['jump_speedup']:.2f}x (prefix cache off); identical rankings: "
              f"{pre['same_rankings_jump']}.", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
