"""Can a pretrained LLM learn the re-ranker's first choice, and at what budget? A probe on 2 cores.

The smollm2 pipeline's SFT models settle on a shown slot (BENCHMARKS.md, "The smollm2 preset"):
~70 steps at lr 1e-4 with 10 trained layers never moved the choice. This probe isolates the
first choice and buys many more optimiser steps for the same time:

- prompts as the pipeline renders them (`text.prompts`: history and candidates with their
  title and the `--fields` chosen: year, genres, the evidence counts; candidates numbered
  0..K-1 in a seeded random order; no SIDs: this model has not learnt them), the assistant
  turn opened with the answer's head `{"recommendations": [`, so the next token is the first
  choice (one digit token);
- the target is the CF teacher's first item (`--target=teacher`), the slate's positive
  (`--target=label`) or a rule read off the shown evidence (`--target=co_watched` /
  `followed_last`: the candidate with the largest count, a function of the prompt wherever that
  maximum is unique and non-zero; can the model learn to read at all?), loss on that one token
  only (full-vocabulary cross-entropy);
- the lower `--frozen` layers never change, so their output for each prompt is computed once
  and kept; each step runs only the upper layers forward and backward;
- evaluation: the arg-max over the K number tokens at that position (what the slate constraint
  makes of the first choice) on test slates: R@1 against the labels with a paired bootstrap
  interval against the legacy order, agreement with the teacher's first item, and the histogram
  of the chosen shown slot (a model that settles on a slot shows it at once), and how often the
  choice is the target where the prompt fixes it;
- `--linear`: where the choice can be read in the lower layers' outputs. Two linear read-outs
  fitted on the cached outputs (no model step): one weight vector scoring every candidate at
  the token where its evidence ends (softmax over the slate), and a K-way classifier at the
  answer position. The first says whether the evidence is there, the second whether the lower
  layers already carry the choice to where it must be written;
- `--route_weight`: a second loss that teaches the upper layers where to look: the first KV
  group of heads of one trained layer (`--route_layer`: the first trained one, or any above),
  from the answer position, puts its attention on the token where the target's evidence ends;
- `--number_again`: each candidate line ends with its number again, after the evidence, so the
  token that sees the evidence is the digit to be written.

  python benchmarks/probe_choice.py --workdir=W --steps=300 --fields=year,evidence
  python benchmarks/probe_choice.py --workdir=W --steps=0 --linear --evidence_format=ranks \
      --cache_dir=/tmp/probe_cache

`--cache_dir` keeps the lower layers' outputs (1.4-1.6 GB for 1,600 prompts at 24 layers), so
runs that differ only in target, learning rate or steps skip the caching pass.

W needs the data and legacy stages (`python -m gr2_jax.main --config=configs/legacy.py
--workdir=W`). Results print as a markdown block; nothing is written to the repository.
"""

import hashlib
import os
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import optax

from gr2_jax.data import artifacts
from gr2_jax.data import slates as slates_lib
from gr2_jax.eval import metrics, tables
from gr2_jax.models import gguf_io, qwen3
from gr2_jax.teachers import cf, cf_stats
from gr2_jax.teachers import evidence as evidence_lib
from gr2_jax.text import chat, prompts
from gr2_jax.train import optim

FLAGS = flags.FLAGS
# The counts of `SlateEvidence.counts`, in its order, as targets (and their rows' names).
RULES = {"co_watched": "arg-max co-watched", "followed_last": "arg-max followed last"}
flags.DEFINE_string("workdir", None, "workdir with data and legacy artifacts", required=True)
flags.DEFINE_string("model", "smollm2", "GGUF path or pretrained name")
flags.DEFINE_integer("frozen", 20, "lower decoder layers kept fixed (their outputs cached)")
flags.DEFINE_integer("train_examples", 800, "training-period slates")
flags.DEFINE_integer("test_examples", 500, "test slates")
flags.DEFINE_integer("steps", 200, "optimiser steps")
flags.DEFINE_integer("batch", 8, "rows per step")
flags.DEFINE_float("lr", 1e-4, "peak learning rate (cosine to 10%, 10 warm-up steps)")
flags.DEFINE_integer("eval_every", 50, "steps between test evaluations")
flags.DEFINE_list("fields", ["year", "evidence"], "item fields shown beside the title "
                  "(year, genres, evidence)")
flags.DEFINE_enum("target", "teacher", ["teacher", "label", *RULES],
                  "what the first choice learns: the CF teacher's first item, the slate's "
                  "positive, or a rule read off the shown evidence (arg-max of one count)")
flags.DEFINE_integer("max_history", 4, "history items shown")
flags.DEFINE_enum("evidence_format", "counts", list(prompts.EVIDENCE_FORMATS),
                  "how the evidence reads")
flags.DEFINE_integer("seed", 0, "display shuffle and batch order")
flags.DEFINE_integer("n_boot", 1000, "bootstrap resamples")
flags.DEFINE_bool("evidence_first", False, "each candidate's evidence right after its number")
flags.DEFINE_bool("number_again", False, "each candidate line ends with its number again, "
                  "after the evidence (`3. Title (1995) | co-watched #2, followed last #1 -> 3`): "
                  "the token that sees the evidence is the number to write")
flags.DEFINE_bool("rules_only", False, "only the rules' rows (no training)")
flags.DEFINE_bool("linear", False, "also fit two linear read-outs of the lower layers' cached "
                  "outputs (no model step): a scorer shared by the candidates, read where each "
                  "candidate's evidence ends, and a K-way classifier of the answer position")
flags.DEFINE_float("route_weight", 0.0, "weight of a second loss on one trained layer's "
                   "attention (`--route_layer`): from the answer position, the heads of its "
                   "first KV group put their mass on the token where the target's evidence ends "
                   "(0 = off)")
flags.DEFINE_integer("route_layer", -1, "the layer whose heads `--route_weight` teaches: -1 = "
                     "the first trained layer, else its index (the last, 29 for SmolLM2, is one "
                     "step from the logits)")
flags.DEFINE_integer("linear_steps", 1000, "full-batch AdamW steps of each linear read-out")
flags.DEFINE_string("cache_dir", "", "keep the lower layers' outputs here, keyed by everything "
                    "that makes them (reruns with another target, lr or step count skip the pass)")

ANSWER_HEAD = '{"recommendations": ['


def _prompt_cfg():
  fields = ("sid", "title") + tuple(FLAGS.fields)
  return prompts.PromptConfig(max_history=FLAGS.max_history, item_fields=fields,
                              evidence_format=FLAGS.evidence_format,
                              reasoning=False, answer_format="positions0")


def _rewrite_candidates(content, k, rewrite):
  """Each candidate line `3. Title (1995) | evidence` of a user message replaced by
  `rewrite(num, body, evidence)`."""
  lines = content.split("\n")
  for j, line in enumerate(lines):
    num, dot, rest = line.partition(". ")
    if dot and num.isdigit() and int(num) < k and " | " in rest:
      body, _, ev = rest.rpartition(" | ")
      lines[j] = rewrite(num, body, ev)
  return "\n".join(lines)


def _evidence_first(num, body, ev):
  """`3. co-watched #2, followed last #1 | Title (1995)`: the evidence beside its number."""
  return f"{num}. {ev} | {body}"


def _number_again(num, body, ev):
  """`3. Title (1995) | co-watched #2, followed last #1 -> 3`: the number ends the line."""
  return f"{num}. {body} | {ev} -> {num}"


def build(split, n, items, stats, teacher, tok, pcfg, rng, legacy_dir):
  """Token ids of each prompt (ending with the answer head), the shown order, targets."""
  sl = slates_lib.load_split(legacy_dir, split, max_examples=n, seed=1)
  k = sl["slate"].shape[1]
  ev = (evidence_lib.SlateEvidence(stats, recent=pcfg.max_history, fmt=pcfg.evidence_format)
        if "evidence" in pcfg.item_fields else None)
  teacher_top = teacher.greedy_orders(sl)[:, 0]
  no_sid = [""] * len(items)
  head = tok.encode(ANSWER_HEAD)
  ids, perms = [], []
  for i in range(len(sl["slate"])):
    hist = [int(h) for h in sl["history"][i] if h >= 0]
    perm = rng.permutation(k)  # shown slot j holds legacy position perm[j]
    slate = [int(sl["slate"][i][p]) for p in perm]
    e = ev(hist, slate) if ev is not None else None
    msgs = prompts.build_messages(
        prompts.with_sids(hist, items, no_sid),
        prompts.with_sids(slate, items, no_sid, e), pcfg)
    if FLAGS.evidence_first and e:
      msgs[1]["content"] = _rewrite_candidates(msgs[1]["content"], k, _evidence_first)
    if FLAGS.number_again:
      msgs[1]["content"] = _rewrite_candidates(msgs[1]["content"], k, _number_again)
    ids.append(np.asarray(chat.encode_chat(msgs, tok, add_generation_prompt=True) + head,
                          np.int32))
    perms.append(perm)
  perms = np.stack(perms)
  inv = np.argsort(perms, 1)  # legacy position -> shown slot
  label_pos = np.asarray(sl["target_index"])
  # The rules a reader of the evidence could apply: arg-max of each count (ties: legacy order).
  # A rule's target is a function of the prompt where its maximum is unique and non-zero
  # (elsewhere the tie is broken by the legacy order, which the shuffled display hides).
  counter = evidence_lib.SlateEvidence(stats, recent=pcfg.max_history)
  counts = [counter.counts([int(h) for h in sl["history"][i] if h >= 0], sl["slate"][i])
            for i in range(len(sl["slate"]))]
  rules, unique = {}, {}
  for r, name in enumerate(RULES):
    rules[name] = np.asarray([np.argmax(c[r]) for c in counts])
    unique[name] = np.asarray([_unique_max(c[r]) for c in counts])
  target_pos = {"teacher": teacher_top, "label": label_pos, **rules}[FLAGS.target]
  return {"ids": ids, "perm": perms, "target_slot": inv[np.arange(len(inv)), target_pos],
          "readable": unique.get(FLAGS.target, np.ones(len(inv), bool)),
          "teacher_slot": inv[np.arange(len(inv)), teacher_top], "slates": sl,
          "teacher_top": teacher_top, "rules": rules}


def _unique_max(values):
  v = np.asarray(values)
  return bool(v.max() > 0 and (v == v.max()).sum() == 1)


def print_rules(test):
  """R@1 of first choices on the test slates, and how often each is the teacher's first item."""
  sl = test["slates"]
  print("\nOn the same test slates (first choice only):\n")
  print("| rule | R@1 | agrees with teacher |")
  print("|---|---|---:|")
  firsts = {"legacy order": np.zeros(len(sl["slate"]), np.int64),
            "CF teacher": test["teacher_top"],
            **{RULES[name]: first for name, first in test["rules"].items()}}
  for name, first in firsts.items():
    r1 = float((first == sl["target_index"]).mean())
    print(f"| {name} | {r1:.4f} | {float((first == test['teacher_top']).mean()):.3f} |")


def evidence_ends(ids, k, tok):
  """Per prompt, the token where each shown candidate's evidence ends: its line's last token
  (evidence last), or the ` |` after the evidence (`--evidence_first`)."""
  nl, dot, end = tok.encode("\n")[0], tok.encode(".")[0], tok.encode("<|im_end|>")[-1]
  num = [tok.encode(str(j))[0] for j in range(k)]
  bar = tok.encode(" |")
  out = []
  for x in ids:
    starts = [max(i for i in range(len(x) - 2) if x[i] == nl and x[i + 1] == num[j] and
                  x[i + 2] == dot) for j in range(k)]
    ends = [s - 1 for s in starts[1:]] + [int(np.flatnonzero(x == end)[-1]) - 1]
    if FLAGS.evidence_first and len(bar) == 1:
      ends = [next(i for i in range(s, e + 1) if x[i] == bar[0]) for s, e in zip(starts, ends)]
    out.append(ends)
  return np.asarray(out)


def fit_linear(x_train, y_train, x_test, scorer):
  """Full-batch AdamW (lr 1e-2, decay 1e-2) on standardised features; arg-max on the test set.
  scorer: x [N, K, D], one weight vector shared by the K candidates; else x [N, D], K-way."""
  flat = x_train.reshape(-1, x_train.shape[-1])
  mu, sd = flat.mean(0), flat.std(0) + 1e-6
  xtr, xte = jnp.asarray((x_train - mu) / sd), jnp.asarray((x_test - mu) / sd)
  k = int(y_train.max()) + 1 if not scorer else x_train.shape[1]
  params = ({"w": jnp.zeros(x_train.shape[-1])} if scorer else
            {"w": jnp.zeros((x_train.shape[-1], k)), "b": jnp.zeros(k)})
  logits = ((lambda p, x: x @ p["w"]) if scorer else (lambda p, x: x @ p["w"] + p["b"]))
  tx = optax.adamw(1e-2, weight_decay=1e-2)
  y = jnp.asarray(y_train)

  @jax.jit
  def step(p, s):
    def loss_fn(p):
      return -jnp.mean(jax.nn.log_softmax(logits(p, xtr))[jnp.arange(len(y)), y])
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = tx.init(params)
  for _ in range(FLAGS.linear_steps):
    params, state, loss = step(params, state)
  train_acc = float((jnp.argmax(logits(params, xtr), -1) == y).mean())
  return np.asarray(jnp.argmax(logits(params, xte), -1)), float(loss), train_acc


def print_linear(train, test, k, judge, legacy_r1):
  """Where the choice is readable in the lower layers' outputs: at each candidate's own line,
  or already at the answer position (which the upper layers would then only pass on)."""
  t0 = time.time()
  ok = train["readable"]
  cand = {name: np.stack([x[e] for x, e in zip(d["x"], d["ends"])])
          for name, d in (("train", train), ("test", test))}
  last = {name: np.stack([x[-1] for x in d["x"]]) for name, d in (("train", train),
                                                                  ("test", test))}
  own = fit_linear(cand["train"].reshape(-1, cand["train"].shape[-1]),
                   np.tile(np.arange(k), len(cand["train"])),
                   cand["test"].reshape(-1, cand["test"].shape[-1]), scorer=False)[0]
  own_acc = float((own == np.tile(np.arange(k), len(cand["test"]))).mean())
  rows = []
  for name, xs, scorer in (("scorer at each candidate's evidence end", cand, True),
                           ("classifier at the answer position", last, False)):
    slots, loss, acc = fit_linear(xs["train"][ok], train["target_slot"][ok], xs["test"],
                                  scorer)
    rows.append((name, loss, acc) + judge(slots))
  print(f"\nLinear read-outs of the lower {FLAGS.frozen} layers' outputs, trained on the "
        f"{ok.sum()} training slates where the target ({FLAGS.target}) is fixed by the prompt, "
        f"{FLAGS.linear_steps} full-batch steps each ({time.time() - t0:.0f} s for the three "
        f"fits); a candidate's own number is read at its evidence's end on {own_acc:.3f} of the "
        f"test candidates:\n")
  print("| read-out | train fit | hits the target (test) | agrees with teacher | R@1 | "
        "R@1 - legacy [95%] | chosen shown slot 0..9 |")
  print("|---|---:|---:|---:|---|---|---|")
  for name, loss, acc, r1, lo, hi, agree, hit, hist in rows:
    print(f"| {name} | {acc:.3f} (loss {loss:.3f}) | {hit:.3f} | {agree:.3f} | {r1:.4f} | "
          f"{r1 - legacy_r1:+.4f} [{lo:+.4f}, {hi:+.4f}] | {' '.join(map(str, hist))} |")


def main(argv):
  del argv
  t0 = time.time()
  real = lambda s: os.path.realpath(os.path.join(FLAGS.workdir, s, "latest"))
  items = artifacts.load_items(real("data"))
  pcfg = _prompt_cfg()
  stats = cf_stats.compute_stats(artifacts.load_interactions(real("data")), items,
                                 window=pcfg.evidence_window)
  teacher = cf.CFTeacher(stats, items, [str(i) for i in range(len(items))])
  model, mcfg, tok = gguf_io.load_gguf(FLAGS.model)
  rng = np.random.default_rng(FLAGS.seed)
  if FLAGS.rules_only:
    test = build("test", FLAGS.test_examples, items, stats, teacher, tok, pcfg, rng,
                 real("legacy"))
    print(f"{len(test['ids'])} test slates, {FLAGS.max_history} history items shown")
    print_rules(test)
    return
  train = build("train", FLAGS.train_examples, items, stats, teacher, tok, pcfg, rng,
                real("legacy"))
  test = build("test", FLAGS.test_examples, items, stats, teacher, tok, pcfg, rng,
               real("legacy"))
  k = train["perm"].shape[1]
  digits = np.asarray([tok.encode(str(d)) for d in range(k)])
  assert digits.shape == (k, 1), "each candidate number must be one token"
  digits = digits[:, 0]
  for data in (train, test):
    data["ends"] = evidence_ends(data["ids"], k, tok)
  lens = [len(x) for x in train["ids"] + test["ids"]]
  logging.info("prompts: %d train, %d test, %d..%d tokens (mean %.0f); %.0f s", len(train["ids"]),
               len(test["ids"]), min(lens), max(lens), np.mean(lens), time.time() - t0)

  L = FLAGS.frozen
  graphdef, state = nnx.split(model)

  def rope_and_mask(b, t):
    """RoPE tables and the causal mask of unpacked rows of t tokens from position 0."""
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos, sin = qwen3.rope_tables(pos, mcfg.head_dim, mcfg.rope_theta)
    return cos, sin, jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

  @jax.jit
  def bottom(state, tokens):
    m = nnx.merge(graphdef, state)
    x = m.embed_tokens(tokens)
    cos, sin, mask = rope_and_mask(*tokens.shape)
    for layer in m.layers[:L]:
      x, _ = qwen3._run_layer(layer, x, cos, sin, mask, None, None)
    return x

  route_layer = L if FLAGS.route_layer < 0 else FLAGS.route_layer
  if not L <= route_layer < mcfg.num_layers:
    raise ValueError(f"--route_layer must be a trained layer ({L}..{mcfg.num_layers - 1}), "
                     f"got {route_layer}")

  def top(state, x, last):
    """Logits [B, V] at `last` and the input of the routed layer [B, T, E]."""
    m = nnx.merge(graphdef, state)
    b, t, _ = x.shape
    cos, sin, mask = rope_and_mask(b, t)
    routed_in = x
    for i, layer in enumerate(m.layers[L:], L):
      if i == route_layer:
        routed_in = x
      x, _ = qwen3._run_layer(layer, x, cos, sin, mask, None, None)
    h = m.norm(x[jnp.arange(b), last])[:, None]
    return m.logits(h)[:, 0], routed_in

  def top_logits(state, x, last):
    return top(state, x, last)[0]

  def route_logprob(state, x, last, at):
    """[B]: log attention mass that the routed layer's first KV group (its query heads,
    averaged) puts, from the answer position `last`, on the token `at`; x: the layer's input."""
    m = nnx.merge(graphdef, state)
    attn = m.layers[route_layer].self_attn
    b, t, _ = x.shape
    cos, sin, _ = rope_and_mask(b, t)
    h = m.layers[route_layer].input_layernorm(x)
    q, k = attn.q_proj(h), attn.k_proj(h)
    if attn.qk_norm:
      q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = qwen3.apply_rope(q, cos, sin), qwen3.apply_rope(k, cos, sin)
    rows = jnp.arange(b)
    group = mcfg.num_heads // mcfg.num_kv_heads  # query heads 0..group-1 read KV head 0
    scores = jnp.einsum("bhd,btd->bht", q[rows, last, :group], k[:, :, 0]) * mcfg.head_dim ** -0.5
    scores = jnp.where(jnp.arange(t)[None, None] <= last[:, None, None], scores, -jnp.inf)
    lp = jax.nn.log_softmax(scores.astype(jnp.float32), -1)
    return jnp.mean(lp[rows, :, at], -1)

  def bucket(n):
    return int(-(-n // 32) * 32)

  def batches(ids, order, size):
    for s in range(0, len(order), size):
      idx = order[s:s + size]
      t = bucket(max(len(ids[i]) for i in idx))
      tokens = np.full((len(idx), t), tok.pad_id, np.int32)
      for r, i in enumerate(idx):
        tokens[r, :len(ids[i])] = ids[i]
      yield idx, tokens, np.asarray([len(ids[i]) - 1 for i in idx], np.int32)

  def cache(data, split):
    # The token ids carry everything else that shapes the prompts (seed, fields, history).
    key = hashlib.sha256(repr((FLAGS.model, L, [x.tolist() for x in data["ids"]])).encode()
                         ).hexdigest()[:16]
    path = os.path.join(FLAGS.cache_dir, f"probe_{split}_{key}.npz") if FLAGS.cache_dir else ""
    if path and os.path.exists(path):
      with np.load(path) as z:
        flat, ends = z["x"], z["ends"]
      logging.info("lower %d layers' outputs for %d %s prompts read from %s", L, len(ends), split,
                   path)
      return np.split(flat, ends[:-1])
    t1 = time.time()
    order = np.argsort([len(x) for x in data["ids"]])  # similar lengths share a bucket
    xs = [None] * len(order)
    ntok = 0
    for idx, tokens, _ in batches(data["ids"], order, 8):
      x = np.asarray(bottom(state, jnp.asarray(tokens)))
      for r, i in enumerate(idx):
        xs[i] = x[r, :len(data["ids"][i])]
      ntok += tokens.size
    logging.info("lower %d layers cached for %d prompts: %.0f s (%.0f tok/s)", L, len(xs),
                 time.time() - t1, ntok / (time.time() - t1))
    if path:
      os.makedirs(FLAGS.cache_dir, exist_ok=True)
      tmp = path + ".tmp.npz"
      np.savez(tmp, x=np.concatenate(xs), ends=np.cumsum([len(x) for x in xs]))
      os.replace(tmp, path)
    return xs

  train["x"], test["x"] = cache(train, "train"), cache(test, "test")

  def xbatch(data, idx):
    t = bucket(max(len(data["x"][i]) for i in idx))
    x = np.zeros((len(idx), t, mcfg.hidden_size), np.float32)
    for r, i in enumerate(idx):
      x[r, :len(data["x"][i])] = data["x"][i]
    return jnp.asarray(x), jnp.asarray([len(data["x"][i]) - 1 for i in idx], np.int32)

  ocfg = optim.OptimConfig(learning_rate=FLAGS.lr, warmup_steps=10,
                           total_steps=max(FLAGS.steps, 1), frozen_layers=L, weight_decay=0.0)
  tx = optim.make_optimizer(ocfg)
  params = state
  opt_state = tx.init(params)
  digits_j = jnp.asarray(digits)

  @jax.jit
  def step(params, opt_state, x, last, target_tok, target_at):
    def loss_fn(p):
      p = optim.stop_frozen(p, L)
      logits, routed_in = top(p, x, last)
      lp = jax.nn.log_softmax(logits)
      loss = -jnp.mean(jnp.take_along_axis(lp, target_tok[:, None], 1))
      route = (-jnp.mean(route_logprob(p, routed_in, last, target_at)) if FLAGS.route_weight
               else 0.0)
      return loss + FLAGS.route_weight * route, (loss, route)
    (_, parts), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    upd, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, parts

  @jax.jit
  def choose(params, x, last):
    return jnp.argmax(top_logits(params, x, last)[:, digits_j], -1)

  sl = test["slates"]
  legacy_vals = tables.per_example(np.tile(np.arange(k), (len(sl["slate"]), 1)), sl)
  teacher_vals = tables.per_example(teacher.greedy_orders(sl), sl)

  def judge(slots):
    """R@1 of first choices (shown slots of the test slates), its paired interval against the
    legacy order, agreement with the teacher, hits of the target where the prompt fixes it."""
    first = test["perm"][np.arange(len(slots)), slots]  # legacy position of the choice
    order = np.stack([np.concatenate([[f], [p for p in range(k) if p != f]]) for f in first])
    vals = tables.per_example(order, sl)
    r1 = vals["R@1"]
    paired = metrics.paired_bootstrap(r1, legacy_vals["R@1"], n_boot=FLAGS.n_boot)
    lo, hi = paired["diff_lo"], paired["diff_hi"]
    hist = np.bincount(slots, minlength=k)
    agree = float((slots == test["teacher_slot"]).mean())
    ok = test["readable"]
    hit = float((slots == test["target_slot"])[ok].mean())
    return float(r1.mean()), float(lo), float(hi), agree, hit, hist

  def evaluate(params, at):
    slots = np.concatenate([np.asarray(choose(params, *xbatch(test, idx)))
                            for idx in np.array_split(np.arange(len(test["x"])),
                                                      -(-len(test["x"]) // 16))])
    r1, lo, hi, agree, hit, hist = judge(slots)
    ok = test["readable"]
    logging.info("step %d: R@1 %.4f (legacy %.4f, teacher %.4f) diff %+.4f [%+.4f, %+.4f]; "
                 "agrees with the teacher %.3f; target %s hit on %.3f of %d; shown slot %s", at,
                 r1, legacy_vals["R@1"].mean(), teacher_vals["R@1"].mean(), r1 -
                 legacy_vals["R@1"].mean(), lo, hi, agree, FLAGS.target, hit, ok.sum(),
                 " ".join(map(str, hist)))
    return at, r1, lo, hi, agree, hit, hist

  if FLAGS.linear:
    print_linear(train, test, k, judge, legacy_vals["R@1"].mean())
    if not FLAGS.steps:
      return
  rows = [evaluate(params, 0)]
  targets = digits[train["target_slot"]]
  target_at = train["ends"][np.arange(len(targets)), train["target_slot"]]
  n = len(train["x"])
  t1, losses, routes = time.time(), [], []
  for s in range(1, FLAGS.steps + 1):
    idx = rng.choice(n, FLAGS.batch, replace=False)
    x, last = xbatch(train, idx)
    params, opt_state, (loss, route) = step(params, opt_state, x, last,
                                            jnp.asarray(targets[idx]),
                                            jnp.asarray(target_at[idx], np.int32))
    losses.append(float(loss))
    routes.append(float(route))
    if s % 10 == 0:
      logging.info("step %d/%d loss %.3f, route loss %.3f (means of 10), %.2f s/step", s,
                   FLAGS.steps, np.mean(losses[-10:]), np.mean(routes[-10:]),
                   (time.time() - t1) / s)
    if s % FLAGS.eval_every == 0 or s == FLAGS.steps:
      rows.append(evaluate(params, s))
  train_s = time.time() - t1
  shown = ",".join(("title",) + tuple(FLAGS.fields))
  routed = (f"route weight {FLAGS.route_weight} (layer {route_layer}), " if FLAGS.route_weight
            else "")
  print(f"\nprobe_choice: frozen {L}, fields {shown} ({FLAGS.evidence_format}"
        f"{', first' if FLAGS.evidence_first else ''}"
        f"{', number again' if FLAGS.number_again else ''}), "
        f"history {FLAGS.max_history}, "
        f"target {FLAGS.target}, "
        f"{routed}"
        f"lr {FLAGS.lr}, batch {FLAGS.batch}, {FLAGS.steps} steps in {train_s:.0f} s "
        f"({train_s / FLAGS.steps:.2f} s/step); {len(train['x'])} train / {len(test['x'])} test "
        f"slates; total {time.time() - t0:.0f} s\n")
  ok = test["readable"]
  print(f"| step | R@1 | R@1 - legacy [95%] | agrees with teacher | hits the target "
        f"({FLAGS.target}, {ok.sum()} slates where the prompt fixes it) | chosen shown slot 0..9 |")
  print("|---:|---|---|---:|---:|---|")
  for at, r1, lo, hi, agree, hit, hist in rows:
    print(f"| {at} | {r1:.4f} | {r1 - legacy_vals['R@1'].mean():+.4f} [{lo:+.4f}, {hi:+.4f}] "
          f"| {agree:.3f} | {hit:.3f} | {' '.join(map(str, hist))} |")
  print_rules(test)


if __name__ == "__main__":
  app.run(main)
