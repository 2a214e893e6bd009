"""SFT stage: the mid-trained model learns the accepted traces of one sampling mode.

The loss covers the assistant turn only (`chat.render_for_training`); within it, tokens of the
reasoning (up to the `"recommendations"` key) weigh `lambda_r` and the ranking tokens (the key,
the SIDs or candidate numbers, the closing brace and `<|im_end|>`) weigh `lambda_o`. A trace
that cannot be used is counted by reason and skipped: malformed line or conversation, SID tokens
the tokenizer lacks (traces of another tokenizer), an answer that is not a ranking of its slate
(SIDs under the mid-trained model's SID table, or numbers 1..K, in the traces' answer format),
or longer than `seq_len`.

Artifact: `model/`, `model_config.json`, `tokenizer/` (as the midtrain artifact, so
`Runtime.load` reads it), `prompt.json` and `sid_table.json` (what re-ranking needs),
`train/` (checkpoints and metrics), `report.json`, `eval.json` / `eval.md` (test re-ranking).
"""

import json
import math
import os
import re
import time

from absl import logging
from flax import nnx
import jax.numpy as jnp
import numpy as np

from gr2_jax.data import artifacts
from gr2_jax.data import slates as slates_lib
from gr2_jax import runner
from gr2_jax.errors import UserError
from gr2_jax.eval import tables
from gr2_jax.parallel import runtime as runtime_lib
from gr2_jax.parallel import sharding as sharding_lib
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.sids import tokens as sid_lib
from gr2_jax.teachers import evidence as evidence_lib
from gr2_jax.text import chat
from gr2_jax.text import parser
from gr2_jax.text import prompts
from gr2_jax.train import optim
from gr2_jax.train import packing
from gr2_jax.train import route as route_lib
from gr2_jax.train import trainer as trainer_lib

SKIP_REASONS = ("malformed", "unknown_sid_tokens", "sid_mismatch", "too_long", "unroutable")
_SID_TOKEN_RE = re.compile(r"<\|sid_begin\|>|<\|sid_end\|>|<s_[a-z]_\d+>")
_NUMBER_RE = re.compile(r"\d+")
_FIRST_ENTRY_RE = re.compile(r'\s*"?([^,\]\s"][^,\]"]*?)"?\s*[,\]]')


def _first_token_at(tok, ids, char_index):
  """Smallest j such that decode(ids[:j]) is longer than char_index (len(ids) if none)."""
  lo, hi = 0, len(ids)
  while lo < hi:
    mid = (lo + hi) // 2
    if len(tok.decode(ids[:mid + 1])) > char_index:
      hi = mid
    else:
      lo = mid + 1
  return lo


def weighted_example(messages, tok, lambda_r, lambda_o, lambda_first=0.0):
  """(ids int32 [T], weights float32 [T]) of a conversation whose last turn is the answer.

  Weights are 0 outside the assistant turn, lambda_r on the reasoning and lambda_o from the
  token that completes the ranking key to the turn's end; with lambda_first > 0 the tokens of
  the ranking's first entry (the re-ranker's choice, which R@1 scores) weigh lambda_first.
  """
  ids, mask = chat.render_for_training(messages, tok)
  weights = mask.astype(np.float32) * lambda_o
  body = np.flatnonzero(mask)
  content = messages[-1]["content"]
  key = content.find(rerank_lib.RANKING_KEY)
  if key > 0 and len(body):
    # The assistant content's own tokens, as encoded in `ids` (the im_end follows them).
    content_ids = ids[body[0]:body[-1]].tolist()
    # The token holding the key's last character starts the ranking part.
    j = _first_token_at(tok, content_ids, key + len(rerank_lib.RANKING_KEY) - 1)
    weights[body[0]:body[0] + j] = lambda_r
    lo = content.find("[", key) if lambda_first > 0 else -1
    entry = _FIRST_ENTRY_RE.match(content, lo + 1) if lo >= 0 else None
    if entry is not None:
      j0 = _first_token_at(tok, content_ids, entry.start(1))
      j1 = _first_token_at(tok, content_ids, entry.end(1) - 1)
      weights[body[0] + j0:body[0] + j1 + 1] = lambda_first
  return ids, weights


def _candidate_line_ends(content, k, first):
  """Character index of the last character of each numbered candidate line (first..first+k-1)
  of a user turn, or None if its candidate block is not there as `prompts` writes it."""
  lines = content.split("\n")
  head = [j for j, line in enumerate(lines) if line.startswith("Candidates (")]
  if len(head) != 1 or head[0] + k > len(lines) - 1:
    return None
  offset = sum(len(line) + 1 for line in lines[:head[0] + 1])
  ends = []
  for n, line in enumerate(lines[head[0] + 1:head[0] + 1 + k], first):
    if not line.startswith(f"{n}. "):
      return None
    ends.append(offset + len(line) - 1)
    offset += len(line) + 1
  return ends


def route_pointers(messages, tok, k, answer_format):
  """int32 [T] over `chat.render_for_training(messages, tok)`'s ids: at the position that
  predicts each number of the answer's ranking, the position of the last token of that
  candidate's prompt line (`gr2_jax.train.route`); -1 elsewhere. None when the candidate lines
  or the ranking's numbers cannot be located."""
  first = prompts.first_number(answer_format)
  ids, _, starts = chat.render_with_starts(messages, tok)
  user = max(j for j, m in enumerate(messages) if m["role"] == "user")
  content = messages[user]["content"]
  ends = _candidate_line_ends(content, k, first)
  user_ids = tok.encode(content)
  if ends is None or tok.decode(user_ids) != content:
    return None
  keys = [starts[user] + _first_token_at(tok, user_ids, c) for c in ends]
  answer = messages[-1]["content"]
  key = answer.find(rerank_lib.RANKING_KEY)
  lo = answer.find("[", key) if key >= 0 else -1
  hi = answer.find("]", lo) if lo >= 0 else -1
  if hi < 0:
    return None
  answer_ids = tok.encode(answer)
  out = np.full(len(ids), -1, np.int32)
  for m in _NUMBER_RE.finditer(answer, lo, hi):
    c = int(m.group()) - first
    if not 0 <= c < k:
      return None
    query = starts[-1] + _first_token_at(tok, answer_ids, m.start()) - 1
    out[query] = keys[c]
  return out if (out >= 0).any() else None


def check_trace(rec, tok, sids, answer_format="sids"):
  """A skip reason (SKIP_REASONS) or None for a usable trace record."""
  try:
    messages = rec["messages"]
    answer = messages[-1]["content"]
    slate = [int(x) for x in rec["slate"]]
    if messages[-1]["role"] != "assistant" or not isinstance(answer, str):
      return "malformed"
  except (KeyError, TypeError, IndexError, ValueError):
    return "malformed"
  text = "".join(m.get("content", "") for m in messages if isinstance(m, dict)
                 and isinstance(m.get("content"), str))
  if any(tok.token_to_id(t) is None for t in set(_SID_TOKEN_RE.findall(text))):
    return "unknown_sid_tokens"
  if any(not 0 <= x < len(sids) for x in slate):
    return "sid_mismatch"
  if not parser.parse_ranking(answer, [sids[x] for x in slate], answer_format).omega:
    return "sid_mismatch"
  return None


def load_examples(path, tok, sids, c, answer_format="sids", route=False):
  """(weighted examples of the usable traces in a jsonl file, skip counts by reason, assistant
  tokens per example, `route_pointers` per example or None without `route`)."""
  examples, skipped = [], {r: 0 for r in SKIP_REASONS}
  lengths, pointers = [], []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        skipped["malformed"] += 1
        continue
      reason = (check_trace(rec, tok, sids, answer_format) if isinstance(rec, dict)
                else "malformed")
      if reason is None:
        try:
          ids, w = weighted_example(rec["messages"], tok, c.lambda_r, c.lambda_o,
                                    c.lambda_first)
        except UserError:
          reason = "malformed"
      if reason is None and len(ids) > c.seq_len:
        reason = "too_long"
      if reason is None and route:
        p = route_pointers(rec["messages"], tok, len(rec["slate"]), answer_format)
        if p is None or len(p) != len(ids):
          reason = "unroutable"
      if reason is not None:
        skipped[reason] += 1
        continue
      examples.append((ids, w))
      lengths.append(int((w > 0).sum()))
      if route:
        pointers.append(p)
  return examples, skipped, lengths, (pointers if route else None)


def evaluate(model, tok, name, slates, items, users, sids, prompt_cfg, c, evidence=None):
  """Table rows of legacy vs the model (free and constrained) and their diagnostics."""
  orders, diags, samples = rerank_lib.evaluate_checkpoint(
      model, tok, name, slates, items, sids, prompt_cfg, users,
      max_new_tokens=c.max_new_tokens, batch_size=c.eval_batch, evidence=evidence)
  n, k = slates["slate"].shape
  orders = dict({"legacy": np.tile(np.arange(k), (n, 1))}, **orders)
  rows = tables.evaluate(orders, slates, n_boot=c.n_boot, seed=c.seed)
  return rows, diags, samples


def _route_eval_fn(model, rows, c, layer, rt, curve):
  """eval_fn for `Trainer.fit`: on the first `route_eval_rows` packed rows, the answer-token
  loss (weighted as trained), the route loss, the routed heads' mean attention on their
  targets, and the first number's own loss and probability (the choice; chance is 1/K) (a fit
  curve: these rows are trained on). Appends each result to `curve`."""
  graphdef = nnx.graphdef(model)
  stats = route_lib.make_diagnostics(graphdef, layer=layer, group=c.route_group)
  n = min(c.route_eval_rows, len(rows["tokens"]))
  fields = trainer_lib.DEVICE_FIELDS + (route_lib.FIELD,)

  def eval_fn(params, step):
    totals = np.zeros(8)
    with sharding_lib.use_rules(rt.mesh, rt.rules):
      for i in range(0, n, c.batch_size):
        b = {k: jnp.asarray(rows[k][i:min(n, i + c.batch_size)]) for k in fields}
        totals += np.asarray([float(v) for v in stats(params, b)])
    nll, w, r_sum, r_n, mass, f_nll, f_n, f_prob = totals
    out = {"answer_loss": nll / max(w, 1.0), "route_loss": r_sum / max(r_n, 1.0),
           "route_attention": mass / max(r_n, 1.0), "first_loss": f_nll / max(f_n, 1.0),
           "first_prob": f_prob / max(f_n, 1.0)}
    curve.append(dict(step=int(step), **{k: round(v, 4) for k, v in out.items()}))
    return out

  return eval_fn


def run(ctx):
  return runtime_lib.run_stage(ctx, _run)


def _run(ctx, rt):
  c = ctx.section
  t_start = time.time()
  if c.lambda_first < 0:
    raise UserError(f"sft.lambda_first must be >= 0 (0 = the first entry weighs lambda_o), "
                    f"got {c.lambda_first}")
  if not 0 <= c.lambda_r <= c.lambda_o or c.lambda_o <= 0:
    raise UserError(f"sft needs 0 <= lambda_r <= lambda_o and lambda_o > 0, got lambda_r "
                    f"{c.lambda_r}, lambda_o {c.lambda_o}")
  traces_dir, mt_dir = ctx.inputs["traces"], ctx.inputs["midtrain"]
  path = os.path.join(traces_dir, f"traces_{c.mode}.jsonl")
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist; sft.mode must be one of the traces stage's modes "
                    f"({', '.join(ctx.config.traces.modes)})")
  model, tok = rt.load(mt_dir)
  table = sid_lib.load_sid_table(runner.artifact_dir(ctx.workdir, ctx.config, "sids"))
  sids = [row["sid"] for row in table["items"]]
  with open(os.path.join(traces_dir, "prompt.json")) as f:
    prompt_fields = json.load(f)
  answer_format = prompt_fields.get("answer_format", "sids")
  routed = c.route_weight > 0
  if c.route_weight < 0:
    raise UserError(f"sft.route_weight must be >= 0 (0 = off), got {c.route_weight}")
  if routed:
    if prompts.first_number(answer_format) is None:
      raise UserError("sft.route_weight routes the answer's candidate numbers to their prompt "
                      "lines: it needs a numbered answer_format (--config.traces.prompt."
                      f"answer_format=positions or positions0), got {answer_format!r}")
    route_layer = route_lib.resolve_layer(model.cfg, c.route_layer, c.frozen_layers)
    route_lib.check_group(model.cfg, c.route_group)
  examples, skipped, lengths, pointers = load_examples(path, tok, sids, c, answer_format,
                                                       route=routed)
  logging.info("[sft] %d usable %s traces; skipped %s", len(examples), c.mode, skipped)
  if not examples:
    raise UserError(f"no usable traces in {path} (skipped: {skipped}); too_long: raise "
                    "--config.sft.seq_len; unknown_sid_tokens / sid_mismatch: rerun the traces "
                    "stage with this workdir's sids and midtrain artifacts; unroutable: the "
                    "traces' prompts lack the numbered candidate lines route_weight needs")
  rows = packing.pack(examples, c.seq_len, tok.pad_id,
                      pointers={route_lib.FIELD: pointers} if routed else None)
  per_step = c.batch_size * c.micro_batches
  steps = c.steps or max(1, math.ceil(c.epochs * len(rows["tokens"]) / per_step))
  logging.info("[sft] %d packed rows of %d tokens (fill %.2f), %d steps",
               len(rows["tokens"]), c.seq_len, (rows["segment_ids"] > 0).mean(), steps)
  ocfg = optim.OptimConfig(learning_rate=c.learning_rate,
                           warmup_steps=min(c.lr_warmup_steps, steps - 1),
                           total_steps=steps, end_lr_ratio=c.end_lr_ratio,
                           weight_decay=c.weight_decay, clip_norm=c.clip_norm,
                           frozen_layers=c.frozen_layers)
  tcfg = trainer_lib.TrainerConfig(num_steps=steps, micro_batches=c.micro_batches,
                                   log_every=c.log_every, checkpoint_every=c.checkpoint_every,
                                   eval_every=c.route_eval_every if routed else 0)
  objective = eval_fn = None
  route_curve = []
  if routed:
    objective = route_lib.objective(model.cfg, layer=route_layer, weight=c.route_weight,
                                    group=c.route_group, frozen_layers=c.frozen_layers)
    logging.info("[sft] route loss: weight %g, layer %d, KV group %d; %d routed answer "
                 "numbers in %d traces", c.route_weight, route_layer, c.route_group,
                 int((rows[route_lib.FIELD] >= 0).sum()), len(examples))
    eval_fn = _route_eval_fn(model, rows, c, route_layer, rt, route_curve)
  tr = trainer_lib.Trainer(model, ocfg, tcfg, mesh=rt.mesh, rules=rt.rules,
                           workdir=ctx.path("train"), name="sft", objective=objective)
  ds = tr.batches(rows, c.batch_size, c.micro_batches, seed=c.seed)
  params, summary = tr.fit(ds, eval_fn=eval_fn)
  model = tr.model(params)
  rt.save(ctx.out_dir, model, tok)
  if runtime_lib.process_zero():
    rerank_lib.save_rerank_info(ctx.out_dir, prompt_fields, table)
  ctx.sync("rerank_info")
  hist = summary["loss_history"]
  report = {
      "mode": c.mode, "traces": len(examples), "skipped": skipped,
      "assistant_tokens": {"mean": float(np.mean(lengths)), "max": int(np.max(lengths))},
      "steps": steps, "tokens_per_sec": summary["tokens_per_sec"], "mfu": summary["mfu"],
      "first_loss": hist[0]["loss"] if hist else None,
      "final_loss": hist[-1]["loss"] if hist else None,
      "train_seconds": summary["wall_seconds"],
  }
  if routed:
    report["route"] = {"weight": c.route_weight, "layer": route_layer, "group": c.route_group,
                       "curve": route_curve}
  if c.eval_examples:
    t0 = time.time()
    legacy_dir = runner.artifact_dir(ctx.workdir, ctx.config, "legacy")
    data_dir = runner.artifact_dir(ctx.workdir, ctx.config, "data")
    slates = slates_lib.load_split(legacy_dir, c.eval_split, max_examples=c.eval_examples,
                                   seed=c.seed)
    if not len(slates.get("slate", ())):
      raise UserError(f"no {c.eval_split} slates in {legacy_dir}; use more data")
    prompt_cfg, _ = rerank_lib.load_rerank_info(ctx.out_dir)
    rows_eval, diags, samples = evaluate(
        model, tok, f"sft-{c.mode}", slates, artifacts.load_items(data_dir),
        artifacts.load_users(data_dir), sids, prompt_cfg, c,
        evidence_lib.for_prompt(prompt_cfg, data_dir))
    md = (tables.format_table(rows_eval) + "\n\n" + rerank_lib.diagnostics_markdown(diags))
    ctx.write_json("eval.json", {"split": c.eval_split, "rows": rows_eval,
                                 "diagnostics": diags, "samples": samples})
    ctx.write_text("eval.md", md + "\n")
    logging.info("[sft] %s re-ranking:\n%s", c.eval_split, md)
    report["eval_seconds"] = round(time.time() - t0, 1)
    report["eval"] = {name: {"R@1": r["R@1"]["mean"], "N@5": r["N@5"]["mean"]}
                      for name, r in rows_eval.items()}
    report["valid_rate"] = {name: d["valid_rate"] for name, d in diags.items()}
  report["wall_seconds"] = round(time.time() - t_start, 1)
  ctx.write_json("report.json", report)
  return report
