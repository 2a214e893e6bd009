"""Mid-training stage: SID tokens into the LLM, warm-up of their rows, training on the four
tasks and slate ranking, optionally a caption phase on SID -> title documents (with rehearsal of
the main mix), generative next-item retrieval with beam search constrained to valid SIDs, and
greedy answers in the slates task's layout.

Artifact: `tokenizer/`, `model/` (final parameters, orbax), `model_config.json`, `warmup/`,
`train/` and `caption/` (checkpoints `ckpt/`, TensorBoard and metrics.jsonl under `tb/`),
`eval.json`, `eval.md`. Later stages read the model with `Runtime.load(artifact_dir)`.
"""

import collections
import os
import time

from absl import logging
import jax
import numpy as np

from gr2_jax.data import artifacts
from gr2_jax.data import preprocess
from gr2_jax.data import sasrec
from gr2_jax.data import slates as slates_lib
from gr2_jax import runner
from gr2_jax.errors import UserError
from gr2_jax.eval import metrics
from gr2_jax.midtrain import tasks as tasks_lib
from gr2_jax.models import qwen3
from gr2_jax.models import vocab as vocab_lib
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.parallel import runtime as runtime_lib
from gr2_jax.sampling import beam
from gr2_jax.sampling import constraints
from gr2_jax.sampling import sampler
from gr2_jax.sids import tokens as sid_lib
from gr2_jax.teachers import cf as cf_teacher
from gr2_jax.text import parser
from gr2_jax.text import prompts
from gr2_jax.text import tokenizers
from gr2_jax.train import optim
from gr2_jax.train import packing
from gr2_jax.train import trainer as trainer_lib

TOP_K = 10


def _pretrained(c, rt):
  """(model, ModelConfig, HFTokenizer) of the base model `hf_checkpoint` or `gguf` names."""
  if c.hf_checkpoint and c.gguf:
    raise UserError("set midtrain.hf_checkpoint or midtrain.gguf, not both")
  model, cfg, tok = rt.load_pretrained(gguf=c.gguf, hf_checkpoint=c.hf_checkpoint)
  if c.gguf:
    return model, cfg, tok
  if tok.vocab_size > cfg.vocab_size:
    raise UserError(f"the tokenizer in {c.hf_checkpoint} has {tok.vocab_size} tokens but the "
                    f"checkpoint has {cfg.vocab_size} embedding rows: they come from different "
                    "vocabularies; use the tokenizer.json saved with the checkpoint")
  if not isinstance(tok, tokenizers.HFTokenizer):
    raise UserError(f"{c.hf_checkpoint} needs a tokenizer.json next to the weights")
  return model, cfg, tok


def _model_and_tokenizer(ctx, rt, sid_token_strs, corpus):
  """(model, tokenizer, ids of the SID tokens) with the SID tokens in the vocabulary."""
  c = ctx.section
  tok_dir = ctx.path("tokenizer")
  if c.hf_checkpoint or c.gguf:
    model, cfg, tok = _pretrained(c, rt)
    tok.add_tokens(sid_token_strs)
    if runtime_lib.process_zero():
      tok.save(tok_dir)
    if tok.vocab_size > cfg.vocab_size:
      model = vocab_lib.extend_vocab(model, tok.vocab_size - cfg.vocab_size, rng=c.seed,
                                     mesh=rt.mesh, rules=rt.rules)
  else:
    if os.path.isdir(tok_dir):
      tok = tokenizers.load_tokenizer(tok_dir)
    else:
      tok = tokenizers.train_sentencepiece(corpus, tok_dir, c.sp_vocab_size,
                                           user_defined_symbols=sid_token_strs, seed=c.seed)
    vocab = -(-tok.vocab_size // 128) * 128  # rows a multiple of 128 shard evenly
    cfg = qwen3.get_model_config(c.model_preset, vocab_size=vocab)
    model = rt.init_model(cfg, seed=c.seed)
  ids = [tok.token_to_id(t) for t in sid_token_strs]
  if any(i is None for i in ids):
    raise UserError(f"tokenizer in {tok_dir} lacks SID tokens; delete it and rerun")
  return model, tok, np.asarray(ids, np.int64)


_RERANK_TEXT_REPEATS = 50


def rerank_texts():
  """System turns of every prompt variant, the answer's JSON and the CF teacher's wording."""
  texts = []
  for reasoning in (True, False):
    for fields in (prompts.DEFAULT_ITEM_FIELDS, ("sid", "genres")):
      cfg = prompts.PromptConfig(reasoning=reasoning, item_fields=fields)
      texts.append(prompts.system_text(cfg))
  texts += ['{"explanation": "', '", "recommendations": ["', '", "', '"]}',
            "History (oldest first):", "Candidates (10):", "User: age , gender , occupation "]
  return texts + cf_teacher.template_texts()


def _encode(tok, docs):
  eos = tok.eos_id
  return [np.asarray(tok.encode(d) + [eos], np.int32) for d in docs]


def _examples(c, pools, shares, seed, total_tokens):
  ex, task_ids = tasks_lib.mix_examples(pools, shares, total_tokens, seed)
  longest = max(len(e) for e in ex)
  if longest > c.seq_len:
    raise UserError(f"a mid-training document has {longest} tokens but seq_len is {c.seq_len}; "
                    "raise --config.midtrain.seq_len or lower max_history_items")
  return [(e, np.ones(len(e), np.float32)) for e in ex], task_ids


def caption_phase_rows(title_rows, mix_rows, rehearsal):
  """Rows of the caption phase: `title_rows` repeated, plus every row of `mix_rows`, so that a
  share `rehearsal` of the rows rehearses the main mix (0 = the title rows alone).

  Repeating the titles rather than cutting the mix keeps every rehearsal row distinct within a
  pass. `rehearsal` in [0, 1) (the stage checks it). Returns (rows, copies of the title rows).
  """
  n_titles, n_mix = len(title_rows["tokens"]), len(mix_rows["tokens"])
  if rehearsal == 0 or n_mix == 0:
    return title_rows, 1
  copies = max(1, round(n_mix * (1 - rehearsal) / (rehearsal * n_titles)))
  rows = {k: np.concatenate([np.tile(v, (copies,) + (1,) * (v.ndim - 1)), mix_rows[k]])
          for k, v in title_rows.items()}
  return rows, copies


def _train_phase(ctx, name, model, ocfg, steps, rows, rt, trainable_rows=None,
                 eval_rows=None):
  c = ctx.section
  tcfg = trainer_lib.TrainerConfig(
      num_steps=steps, micro_batches=c.micro_batches, log_every=c.log_every,
      eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
      task_names=tasks_lib.TASKS)
  tr = trainer_lib.Trainer(model, ocfg, tcfg, mesh=rt.mesh, rules=rt.rules,
                           workdir=ctx.path(name),
                           trainable_rows=trainable_rows, name=f"midtrain/{name}")
  ds = tr.batches(rows, c.batch_size, c.micro_batches, seed=c.seed)
  eval_fn = None
  if eval_rows is not None:
    eval_fn = lambda p, step: {"heldout_loss": tr.evaluate_loss(p, eval_rows, c.batch_size)}
  params, summary = tr.fit(ds, eval_fn=eval_fn)
  return tr.model(params), summary


# --- evaluation -------------------------------------------------------------------------

def _sid_index(table, tok):
  seqs, index = [], {}
  for row in table["items"]:
    ids = tuple(tok.encode(row["sid"]))
    seqs.append(ids)
    index[ids] = row["id"]
  return seqs, index


def _retrieval_ranks(model, tok, prompts, excluded, targets, trie, index, c, sid_len):
  """0-based rank of the target in the beam's top 10 after dropping excluded items (10 = miss)."""
  ranks, valid_free = [], []
  for s in range(0, len(prompts), c.eval_batch):
    batch = [tok.encode(p) for p in prompts[s:s + c.eval_batch]]
    toks, scores = beam.beam_search(model, batch, beam_width=c.beam_width, num_steps=sid_len,
                                    constraint=trie, pad_id=tok.pad_id, prompt_multiple=16)
    toks, scores = np.asarray(toks), np.asarray(scores)
    free = sampler.sample(model, batch, key=jax.random.key(0), max_new_tokens=sid_len,
                          greedy=True, pad_id=tok.pad_id, prompt_multiple=16)
    for j in range(len(batch)):
      e = s + j
      ex = set(int(x) for x in excluded[e] if x >= 0)
      ranked = []
      for w in range(toks.shape[1]):
        item = index.get(tuple(toks[j, w].tolist()))
        if np.isfinite(scores[j, w]) and item is not None and item not in ex:
          ranked.append(item)
      ranked = ranked[:TOP_K]
      ranks.append(ranked.index(targets[e]) if targets[e] in ranked else TOP_K)
      valid_free.append(float(tuple(np.asarray(free.tokens[j]).tolist()) in index))
  return np.asarray(ranks), np.asarray(valid_free)


def _caption_accuracy(model, tok, items, table, item_ids, c):
  max_new = max(len(tok.encode(items[i]["title"])) for i in item_ids) + 2
  hits = []
  for s in range(0, len(item_ids), c.eval_batch):
    ids = item_ids[s:s + c.eval_batch]
    batch = [tok.encode(tasks_lib.caption_prompt(table["items"][i]["sid"])) for i in ids]
    out = sampler.sample(model, batch, key=jax.random.key(0), max_new_tokens=max_new,
                         greedy=True, stop_tokens=(tok.eos_id,), pad_id=tok.pad_id,
                         prompt_multiple=8)
    for j, i in enumerate(ids):
      text = tok.decode(np.asarray(out.tokens[j, :int(out.lengths[j])]).tolist())
      hits.append(float(text.split("\n")[0].strip() == items[i]["title"]))
  return np.asarray(hits)


def _slate_answers(model, tok, slates, sids, c):
  """Greedy answers of the slates task's layout (candidates in the legacy order) parsed with
  Omega: the valid rate, reasons, and R@1 with an invalid answer counted as the legacy order."""
  slates_sids = [[sids[i] for i in slate] for slate in slates["slate"]]
  batch = []
  for hist, shown in zip(slates["history"], slates_sids):
    hist = hist[hist >= 0][-c.max_history_items:]
    batch.append(tok.encode(tasks_lib.slate_prompt([sids[i] for i in hist], shown)))
  budget = len(tok.encode(prompts.render_answer(slates_sids[0]))) + 8
  texts = []
  for s in range(0, len(batch), c.eval_batch):
    out = sampler.sample(model, batch[s:s + c.eval_batch], key=jax.random.key(0),
                         max_new_tokens=budget, greedy=True, stop_tokens=(tok.eos_id,),
                         pad_id=tok.pad_id, prompt_multiple=16)
    texts += [tok.decode(np.asarray(out.tokens[j, :int(out.lengths[j])]).tolist())
              for j in range(len(out.lengths))]
  # The order of an invalid answer is the identity, i.e. the legacy order shown.
  omega, order, reasons, prefix = parser.parse_batch([t.split("\n")[0] for t in texts],
                                                     slates_sids)
  hits = (order[:, 0] == slates["target_index"]).astype(np.float32)
  legacy = (slates["target_index"] == 0).astype(np.float32)
  return {"n": len(texts), "valid_rate": float(omega.mean()),
          "reasons": dict(collections.Counter(reasons)),
          "mean_valid_prefix": float(prefix.mean()),
          "R@1": metrics.bootstrap_ci(hits, c.n_boot, seed=c.seed),
          "legacy R@1": metrics.bootstrap_ci(legacy, c.n_boot, seed=c.seed)}


def _legacy_ranks(ctx, examples, inter, rows, num_items):
  lc = ctx.config.legacy
  legacy_dir = ctx.inputs["legacy"]
  pop = np.load(os.path.join(legacy_dir, "popularity.npy"))
  excluded = slates_lib.exclusion_lists({k: v[rows] for k, v in examples.items()}, inter)
  if not os.path.isdir(os.path.join(legacy_dir, "sasrec")):
    # An impression log's slates come from the funnel: no SASRec to compare with.
    return None, sasrec.popularity_ranks(excluded, examples["target"][rows], pop), excluded
  with mesh_lib.outside_mesh():  # SASRec on this process's first device, not the model's mesh
    model = sasrec.restore(os.path.join(legacy_dir, "sasrec"), sasrec.config_of(lc, num_items))
    _, _, r_sas, r_pop = sasrec.rank_and_top_k(model, examples["history"][rows], excluded,
                                               examples["target"][rows], pop, TOP_K,
                                               batch_size=256)
  return r_sas, r_pop, excluded


def _table(per_ranker, c):
  out = {}
  for name, ranks in per_ranker.items():
    out[name] = {}
    for k in (5, 10):
      out[name][f"R@{k}"] = metrics.bootstrap_ci(metrics.recall_at_k(ranks, k), c.n_boot, seed=c.seed)
      out[name][f"N@{k}"] = metrics.bootstrap_ci(metrics.ndcg_at_k(ranks, k), c.n_boot, seed=c.seed)
  return out


def _markdown(report):
  lines = ["| split | ranker | R@5 | R@10 | N@5 | N@10 |", "|---|---|---|---|---|---|"]
  for split, table in report["retrieval"].items():
    for name, m in table.items():
      cells = [f"{m[k]['mean']:.4f} [{m[k]['lo']:.4f}, {m[k]['hi']:.4f}]"
               for k in ("R@5", "R@10", "N@5", "N@10")]
      lines.append(f"| {split} | {name} | " + " | ".join(cells) + " |")
  lines.append("")
  cap = report["caption_accuracy"]
  lines.append(f"SID -> exact title accuracy (items seen in training): {cap['mean']:.4f} "
               f"[{cap['lo']:.4f}, {cap['hi']:.4f}] (n={cap['n']})")
  for split, v in report["valid_sid_rate_unconstrained"].items():
    lines.append(f"valid-SID rate of unconstrained greedy generation ({split}): {v:.4f}")
  sa = report.get("slate_answers")
  if sa:
    r1, leg = sa["R@1"], sa["legacy R@1"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(sa["reasons"].items()))
    lines.append(f"slates task, greedy answers on {sa['n']} validation slates: valid "
                 f"{sa['valid_rate']:.4f} ({reasons}); mean valid prefix "
                 f"{sa['mean_valid_prefix']:.2f} of the slate; "
                 f"R@1 {r1['mean']:.4f} [{r1['lo']:.4f}, {r1['hi']:.4f}] (invalid = legacy order) "
                 f"vs legacy {leg['mean']:.4f}")
  return "\n".join(lines)


def evaluate(ctx, model, tok, table, items, examples, inter):
  c = ctx.section
  seqs, index = _sid_index(table, tok)
  sid_len = len(seqs[0])
  trie = constraints.trie_constraint(seqs, model.cfg.vocab_size)
  rng = np.random.default_rng(c.seed)
  report = {"retrieval": {}, "valid_sid_rate_unconstrained": {}, "ratio_r10_vs_sasrec": {}}
  for period, split in ((2, "validation"), (3, "test")):
    rows = np.flatnonzero(examples["period"] == period)
    rows = np.sort(rng.choice(rows, min(c.eval_examples, len(rows)), replace=False))
    r_sas, r_pop, excluded = _legacy_ranks(ctx, examples, inter, rows, len(items))
    prompts = []
    for r in rows:
      hist = examples["history"][r]
      hist = hist[hist >= 0][-c.max_history_items:]
      prompts.append(tasks_lib.sequential_prompt([table["items"][i]["sid"] for i in hist]))
    t0 = time.time()
    r_llm, valid = _retrieval_ranks(model, tok, prompts, excluded, examples["target"][rows],
                                    trie, index, c, sid_len)
    logging.info("[midtrain] %s: beam search over %d examples in %.1fs", split, len(rows),
                 time.time() - t0)
    rankers = {"popularity": r_pop, "sasrec (legacy)": r_sas, "llm (constrained beam)": r_llm}
    report["retrieval"][split] = _table({k: v for k, v in rankers.items() if v is not None}, c)
    report["valid_sid_rate_unconstrained"][split] = float(valid.mean())
    llm10 = report["retrieval"][split]["llm (constrained beam)"]["R@10"]["mean"]
    sas10 = (report["retrieval"][split]["sasrec (legacy)"]["R@10"]["mean"] if r_sas is not None
             else 0.0)
    report["ratio_r10_vs_sasrec"][split] = llm10 / sas10 if sas10 > 0 else None
  seen = np.unique(inter["item"][artifacts.training_mask(inter)])
  cap_ids = np.sort(rng.choice(seen, min(c.caption_items, len(seen)), replace=False)).tolist()
  report["caption_accuracy"] = metrics.bootstrap_ci(
      _caption_accuracy(model, tok, items, table, cap_ids, c), c.n_boot, seed=c.seed)
  val = slates_lib.load_split(ctx.input_path("legacy"), "validation",
                              max_examples=c.eval_examples, seed=c.seed)
  if len(val.get("slate", ())):
    sids = [row["sid"] for row in table["items"]]
    report["slate_answers"] = _slate_answers(model, tok, val, sids, c)
  return report


def run(ctx):
  return runtime_lib.run_stage(ctx, _run)


def _run(ctx, rt):
  c = ctx.section
  t_start = time.time()
  data_dir = runner.artifact_dir(ctx.workdir, ctx.config, "data")  # an input of sids
  items = artifacts.load_items(data_dir)
  users = artifacts.load_users(data_dir)
  inter = artifacts.load_interactions(data_dir)
  examples = preprocess.load_examples(os.path.join(data_dir, "examples.npz"))
  table = sid_lib.load_sid_table(ctx.input_path("sids"))
  if len(table["items"]) != len(items):
    raise UserError(f"the SID table has {len(table['items'])} items but the data artifact "
                    f"{len(items)}; rerun the sids stage on this data")
  sids = [row["sid"] for row in table["items"]]
  sid_token_strs = sid_lib.all_sid_tokens(table["num_levels"], table["codebook_size"])
  mask = artifacts.training_mask(inter)
  seen = np.unique(inter["item"][mask])
  shares = tasks_lib.parse_mix(dict(c.task_mix))
  if c.caption_steps < 0:
    raise UserError(f"midtrain.caption_steps={c.caption_steps} must be >= 0 (0 = no caption phase)")
  if not 0 <= c.caption_rehearsal < 1:
    raise UserError(f"midtrain.caption_rehearsal={c.caption_rehearsal} must be in [0, 1)")
  slate_docs = []
  if shares[tasks_lib.TASKS.index("slates")] > 0:
    train_slates = slates_lib.load_split(ctx.input_path("legacy"), "train",
                                         max_examples=c.slate_examples, seed=c.seed)
    if len(train_slates.get("slate", ())):
      slate_docs = tasks_lib.slate_docs(train_slates, sids, c.max_history_items, c.seed)
  docs = [tasks_lib.sequential_docs(examples, sids, c.max_history_items),
          tasks_lib.caption_docs(items, sids, seen.tolist()),
          tasks_lib.persona_docs(users, items, inter, mask, sids, c.max_history_items),
          tasks_lib.text_docs([items[i] for i in seen]),
          slate_docs]
  corpus = docs[3] + docs[1][1::2] + [d.split("\n")[0] for d in docs[2]]
  # The re-ranking turns later stages write (system turns, JSON keys, trace wording) weigh like
  # frequent text, so their words become whole pieces rather than letters.
  corpus += _RERANK_TEXT_REPEATS * rerank_texts()
  model, tok, sid_ids = _model_and_tokenizer(ctx, rt, sid_token_strs, corpus)
  logging.info("[midtrain] model %s: %d parameters (vocab %d, %d SID tokens)",
               c.hf_checkpoint or c.gguf or c.model_preset, qwen3.param_counts(model)[0],
               model.cfg.vocab_size, len(sid_ids))
  pools = [_encode(tok, d) for d in docs]
  for name, pool in zip(tasks_lib.TASKS, pools):
    logging.info("[midtrain] task %-10s %7d documents, %9d tokens", name, len(pool),
                 sum(len(p) for p in pool))
  per_step = c.batch_size * c.micro_batches * c.seq_len
  # ~85% of a packed row holds tokens; a little extra keeps the last steps on fresh data.
  total = int((c.warmup_steps + c.steps) * per_step * 0.9)
  ex, task_ids = _examples(c, pools, shares, c.seed, total)
  rows = packing.pack(ex, c.seq_len, tok.pad_id, task_ids)
  held = min(len(rows["tokens"]) // 10, 4 * c.batch_size)
  eval_rows = {k: v[:held] for k, v in rows.items()}
  rows = {k: v[held:] for k, v in rows.items()}
  logging.info("[midtrain] %d packed rows of %d tokens (fill %.2f), %d held out",
               len(rows["tokens"]), c.seq_len, (rows["segment_ids"] > 0).mean(), held)

  ocfg = optim.OptimConfig(learning_rate=c.warmup_lr, warmup_steps=0,
                           total_steps=max(c.warmup_steps, 1), end_lr_ratio=1.0,
                           clip_norm=c.clip_norm)
  summary = {}
  if c.warmup_steps:
    model, summary["warmup"] = _train_phase(ctx, "warmup", model, ocfg, c.warmup_steps, rows,
                                            rt, trainable_rows=sid_ids)
  ocfg = optim.OptimConfig(learning_rate=c.learning_rate, warmup_steps=c.lr_warmup_steps,
                           total_steps=c.steps, end_lr_ratio=c.end_lr_ratio,
                           weight_decay=c.weight_decay, clip_norm=c.clip_norm,
                           frozen_layers=c.frozen_layers)
  model, summary["train"] = _train_phase(ctx, "train", model, ocfg, c.steps, rows, rt,
                                         eval_rows=eval_rows)
  if c.caption_steps:
    # The catalogue phase: SID -> title documents until the titles are memorised, mixed with
    # rehearsal rows of the main mix so that the other tasks are not overwritten.
    docs = _encode(tok, tasks_lib.title_docs(items, sids, seen.tolist()))
    cap = packing.pack([(d, np.ones(len(d), np.float32)) for d in docs], c.seq_len, tok.pad_id,
                       [tasks_lib.TASKS.index("caption")] * len(docs))
    n_titles = len(cap["tokens"])
    cap, copies = caption_phase_rows(cap, rows, c.caption_rehearsal)
    n_rows = len(cap["tokens"])
    logging.info("[midtrain] caption phase: %d SID -> title documents in %d packed rows x %d "
                 "copies + %d rehearsal rows (share %.2f); one pass over the titles every "
                 "%.1f steps", len(seen), n_titles, copies, n_rows - copies * n_titles,
                 1 - copies * n_titles / n_rows,
                 n_rows / copies / (c.batch_size * c.micro_batches))
    ocfg = optim.OptimConfig(learning_rate=c.caption_lr, warmup_steps=c.lr_warmup_steps,
                             total_steps=c.caption_steps, end_lr_ratio=c.end_lr_ratio,
                             weight_decay=c.weight_decay, clip_norm=c.clip_norm,
                             frozen_layers=c.frozen_layers)
    model, summary["caption"] = _train_phase(ctx, "caption", model, ocfg, c.caption_steps, cap,
                                             rt, eval_rows=eval_rows)
  rt.save(ctx.out_dir, model, tok)
  t_eval = time.time()
  report = evaluate(ctx, model, tok, table, items, examples, inter)
  report["eval_seconds"] = round(time.time() - t_eval, 1)
  report["training"] = {
      phase: {k: s[k] for k in ("steps", "tokens_per_sec", "mfu", "task_tokens",
                                "loss_history", "wall_seconds", "resumed_from")}
      for phase, s in summary.items()}
  report["wall_seconds"] = round(time.time() - t_start, 1)
  ctx.write_json("eval.json", report)
  text = _markdown(report)
  ctx.write_text("eval.md", text + "\n")
  logging.info("[midtrain] evaluation:\n%s", text)
  train = summary["train"]
  hist = train["loss_history"]
  return {
      "first_loss": hist[0]["loss"] if hist else None,
      "final_loss": hist[-1]["loss"] if hist else None,
      "task_tokens": train["task_tokens"],
      "tokens_per_sec": train["tokens_per_sec"], "mfu": train["mfu"],
      "caption_accuracy": report["caption_accuracy"]["mean"],
      "valid_sid_rate_unconstrained": report["valid_sid_rate_unconstrained"],
      "ratio_r10_vs_sasrec": report["ratio_r10_vs_sasrec"],
      "slate_answers_valid_rate": report.get("slate_answers", {}).get("valid_rate"),
      "r10": {s: {n: m["R@10"]["mean"] for n, m in t.items()}
              for s, t in report["retrieval"].items()},
      "wall_seconds": report["wall_seconds"],
  }
