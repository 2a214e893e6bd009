"""The RL loop of the rl, opd and internalize stages: the policy's train state and jitted
step (`Policy`), the iterations (`train_policy`: rollouts, rewards, the algorithm's update,
logging, validation, checkpoints that resume), the data they read, and the final table.

The stage module `gr2_jax.stages.rl` documents one iteration.
"""

import collections
import dataclasses
import os
import time

from absl import logging
import jax
import numpy as np

from gr2_jax import runner
from gr2_jax.data import artifacts
from gr2_jax.data import slates as slates_lib
from gr2_jax.errors import UserError
from gr2_jax.eval import compare
from gr2_jax.eval import tables
from gr2_jax.parallel import sharding as sharding_lib
from gr2_jax.rankers import scores as scores_lib
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.rl import algorithm
from gr2_jax.rl import diagnostics as diag_lib
from gr2_jax.rl import learner
from gr2_jax.rl import registry
from gr2_jax.rl import rollout as rollout_lib
from gr2_jax.teachers import evidence as evidence_lib
from gr2_jax.train import checkpoint as ckpt_lib
from gr2_jax.train import metrics_log
from gr2_jax.train import optim
from gr2_jax.train import trainer as trainer_lib


def check_config(c):
  registry.REWARDS.get(c.reward)
  return check_algorithm(c)


def check_algorithm(c, what="rl"):
  """The section's algorithm and the rollout / update sizes it needs (any policy's loop)."""
  alg = algorithm.from_section(c)
  problems = []
  if c.group_size < 2:
    problems.append(f"group_size {c.group_size} < 2 (group advantages need two samples)")
  if c.train_groups < 1 or c.rollout_prompts < c.train_groups:
    problems.append(f"need 1 <= train_groups ({c.train_groups}) <= rollout_prompts "
                    f"({c.rollout_prompts})")
  elif alg.dynamic_sampling and c.rollout_prompts == c.train_groups:
    problems.append(f"dynamic sampling refills the update from an oversampled batch: "
                    f"rollout_prompts ({c.rollout_prompts}) must exceed train_groups "
                    f"({c.train_groups}), or set dynamic_sampling=False")
  if (c.train_groups * c.group_size) % c.minibatches:
    problems.append(f"minibatches {c.minibatches} must divide train_groups x group_size "
                    f"({c.train_groups * c.group_size})")
  if c.iterations < 1 or c.ppo_epochs < 1 or c.minibatches < 1:
    problems.append("iterations, ppo_epochs and minibatches must be >= 1")
  if c.temperature <= 0 or c.max_new_tokens < 1:
    problems.append("temperature must be > 0 and max_new_tokens >= 1")
  if problems:
    raise UserError(f"{what} config: " + "; ".join(problems))
  return alg


def _round_up(x, m):
  return -(-x // m) * m


def skip_reasons(ro, step_metrics):
  """{reason: count} of the iteration's skipped steps: "all_invalid" (no rollout valid),
  "no_signal_or_variance" (a step whose minibatch held no token with signal: no kept group,
  whose filler rows are masked out, or GRPO groups whose rollouts all scored alike) or
  "non_finite" (a NaN or infinite loss or gradient)."""
  out = collections.Counter()
  for m in step_metrics:
    if not m["skipped"]:
      continue
    if not ro.omega.any():
      out["all_invalid"] += 1
    elif float(m["signal_tokens"]) == 0:
      out["no_signal_or_variance"] += 1
    else:
      out["non_finite"] += 1
  return dict(out)


class Policy:
  """The train state of the policy with its jitted RL step and checkpoints."""

  def __init__(self, model, c, alg, rt, workdir, name, total_updates, teacher=None):
    ocfg = optim.OptimConfig(learning_rate=c.learning_rate,
                             warmup_steps=min(c.lr_warmup_steps, total_updates - 1),
                             total_steps=total_updates, end_lr_ratio=c.end_lr_ratio,
                             weight_decay=c.weight_decay, clip_norm=c.clip_norm,
                             frozen_layers=c.frozen_layers)
    # The trainer supplies the optimiser, shardings and initial state; the step is RL's own.
    self.tr = trainer_lib.Trainer(model, ocfg, trainer_lib.TrainerConfig(num_steps=total_updates),
                                  mesh=rt.mesh, rules=rt.rules, workdir=workdir, name=name)
    self.mesh = rt.mesh
    self.rules = rt.rules
    self.temperature = float(c.temperature)
    self.loss_cfg = alg.loss_config(c.max_new_tokens, c.temperature)
    shardings = self.tr.state_shardings
    self.opd = alg.policy_loss == "opd"
    self.teacher_logps = None
    if self.opd:
      # OPD: kl_beta weighs the KL to the frozen teacher, whose log-probs the step computes.
      if teacher is None:
        raise UserError("policy_loss 'opd' needs a teacher model (the opd stage)")
      t_graphdef, t_params, t_mesh = teacher
      self.ref_params = None
      if t_mesh is not None:
        # The teacher on its own devices: its log-probs of each update's rows are computed
        # there and moved to the student's devices (`learner.teacher_logps`).
        self.teacher_logps = lambda rows: np.asarray(learner.teacher_logps(
            t_graphdef, t_params, rows, self.temperature, t_mesh, rt.mesh))
        t_graphdef, t_params = None, None
      fn = learner.make_opd_step(self.tr.graphdef, t_graphdef, self.tr.tx, self.tr.schedule,
                                 self.loss_cfg, frozen_layers=c.frozen_layers)
      jitted = jax.jit(fn, in_shardings=(shardings, None, None),
                       out_shardings=(shardings, None), donate_argnums=0)
      self.step = lambda state, batch: jitted(state, t_params, batch)
    else:
      # The KL reference is the policy the run started from (the SFT model), also after a
      # resume.
      self.ref_params = self.tr.initial_params() if alg.kl_beta else None
      fn = learner.make_rl_step(self.tr.graphdef, self.tr.tx, self.tr.schedule, self.loss_cfg,
                                frozen_layers=c.frozen_layers)
      self.step = jax.jit(fn, in_shardings=(shardings, None), out_shardings=(shardings, None),
                          donate_argnums=0)
    self.manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "ckpt"), max_to_keep=2)

  def put(self, rows):
    """An update's rows (the same on every process) on the mesh, split over "batch"; each
    process moves only the rows its devices hold."""
    out = {}
    for k, v in rows.items():
      axes = ("batch", "length")[:np.ndim(v)]
      spec = sharding_lib.logical_to_spec(axes, self.rules, self.mesh, np.shape(v))
      out[k] = sharding_lib.put_global(np.asarray(v), jax.sharding.NamedSharding(self.mesh, spec))
    return out

  def reference_logps(self, rows):
    """Per-token log-probs [N, T] of rows under the reference policy (None without KL)."""
    if self.ref_params is None:
      return None
    return learner.sequence_logps(self.tr.graphdef, self.ref_params, rows, self.temperature)

  def restore_or_init(self):
    """(state, metadata or None)."""
    if self.manager.latest_step() is None:
      return self.tr.init_state(), None
    return self.manager.restore(self.tr.abstract_state())


def _validation_eval(model, tok, slates, items, users, sids, prompt_cfg, c, evidence=None):
  """The greedy policy against the legacy order: (scalars for the logs, markdown table).

  Free decoding always; with `constrain_ranking` also decoding under the slate constraint, the
  mode the rollouts use, whose row gives the ranking scalars (a free answer the model cannot
  yet make valid would read as the legacy order and hide what RL changed).
  """
  modes = (False, True) if c.constrain_ranking else (False,)
  orders, diags, _ = rerank_lib.evaluate_checkpoint(
      model, tok, "policy", slates, items, sids, prompt_cfg, users,
      max_new_tokens=c.max_new_tokens, batch_size=c.eval_batch, constrained=modes,
      evidence=evidence)
  k = slates["slate"].shape[1]
  orders = {"legacy": np.tile(np.arange(k), (len(slates["slate"]), 1)), **orders}
  rows = tables.evaluate(orders, slates, n_boot=min(c.n_boot, 200), seed=c.seed)
  row = rerank_lib.row_name("policy", modes[-1])
  d = diags[row]
  scalars = {"R@1": rows[row]["R@1"]["mean"], "legacy_R@1": rows["legacy"]["R@1"]["mean"],
             "N@5": rows[row]["N@5"]["mean"], "valid_rate": diags["policy"]["valid_rate"],
             "identity_rate": d["identity_rate"], "kendall_tau": d["kendall_tau"]}
  return scalars, tables.format_table(rows) + "\n\n" + rerank_lib.diagnostics_markdown(diags)


def update(pol, state, prompts, responses, logps, plan, c, pad_id, rng, ref_logps_fn=None):
  """One iteration's update: the training rows of the plan's groups (padded to one compiled
  width), then `ppo_epochs` passes of `minibatches` steps in a seeded order. Returns (state,
  the steps' metrics on the host, how many steps were skipped)."""
  width = _round_up(max(len(x) for x in prompts), rerank_lib.PROMPT_MULTIPLE) + c.max_new_tokens
  rows = algorithm.update_rows(prompts, responses, logps, plan, c.group_size, width, pad_id,
                               ref_logps_fn)
  step_metrics = []
  n_rows = len(rows["tokens"])
  mb = n_rows // c.minibatches
  for _ in range(c.ppo_epochs):
    perm = rng.permutation(n_rows)
    for s in range(0, n_rows, mb):
      part = {k: v[perm[s:s + mb]] for k, v in rows.items()}
      state, m = pol.step(state, pol.put(part))
      step_metrics.append(m)
  step_metrics = jax.device_get(step_metrics)
  return state, step_metrics, int(sum(m["skipped"] for m in step_metrics))


def train_policy(ctx, c, name, model, tok, data, sids, prompt_cfg, rt, teacher=None,
                 contexts=None):
  """Runs the RL iterations of one variant on the runtime `rt` (gr2_jax.parallel.runtime);
  returns (model, report). `teacher`: (graphdef,
  params, mesh or None) of the frozen teacher of the OPD loss (`algorithm: opd`); with a mesh
  the teacher runs on those devices, else inside the student's step. `contexts`: (slates) ->
  one text per slate shown in place of its history (the context compressor's summaries),
  computed before each iteration's clock starts and timed apart (`context_seconds`)."""
  alg = check_config(c)
  g, p_roll, p_train = c.group_size, c.rollout_prompts, c.train_groups
  total_updates = c.iterations * c.ppo_epochs * c.minibatches
  # DAPO's soft overlong buffer, at most a quarter of the response budget.
  buffer = min(int(alg.overlong_buffer), c.max_new_tokens // 4)
  workdir = ctx.path(name)
  pol = Policy(model, c, alg, rt, workdir, name, total_updates, teacher)
  state, meta = pol.restore_or_init()
  start = 0 if meta is None else int(meta["step"])
  history = [] if meta is None else meta["history"]
  skipped = {"all_invalid": 0, "no_signal_or_variance": 0, "non_finite": 0}
  if meta is not None:
    skipped.update(meta.get("skipped", {}))
    logging.info("[%s] resumed at iteration %d", name, start)
  # Slates the reward cannot rank (no target in the slate; no positive or no negative) give
  # no gradient: they are never rolled out.
  signal = algorithm.slate_has_signal(c.reward, data["train"])
  train = {k: v[signal] for k, v in data["train"].items()}
  n_train = len(train["slate"])
  logging.info("[%s] %d of %d training slates can be ranked by reward %r", name, n_train,
               len(signal), c.reward)
  if n_train < p_roll:
    raise UserError(f"{n_train} training slates with signal for reward {c.reward!r} cannot fill "
                    f"{p_roll} rollout prompts")
  logger = metrics_log.MetricsLogger(os.path.join(workdir, "tb"), c.iterations, f"[{name}] ")
  t_stage = time.time()
  try:
    for it in range(start, c.iterations):
      t_ctx = time.time()
      rng = np.random.default_rng([c.seed, it])
      idx = np.sort(rng.choice(n_train, size=p_roll, replace=False))
      batch = {k: v[idx] for k, v in train.items()}
      summaries = contexts(batch) if contexts is not None else None
      t0 = time.time()
      t_ctx = t0 - t_ctx
      policy_model = pol.tr.model(state["params"])
      ro = rollout_lib.rollout(
          policy_model, tok, batch, data["items"], sids, prompt_cfg, data["users"],
          group_size=g, shuffle=c.shuffle, key=jax.random.fold_in(jax.random.key(c.seed), it),
          rng=rng, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
          batch_size=c.rollout_batch, constrain_ranking=c.constrain_ranking,
          evidence=data.get("evidence"), summaries=summaries,
          jump_forward=c.get("jump_forward", 0))
      t_roll = time.time() - t0
      comps = rollout_lib.score(ro, c.reward, alpha=c.alpha, invalid_penalty=c.invalid_penalty)
      total = algorithm.shape_rewards(comps["total"], ro.lengths, ro.finished,
                                      c.max_new_tokens, buffer, c.invalid_penalty)
      rewards = total.reshape(p_roll, g)
      plan = algorithm.plan_update(rewards, comps["has_signal"].reshape(p_roll, g).all(-1),
                                   alg, p_train)
      state, step_metrics, n_skipped = update(
          pol, state, ro.prompts, ro.responses, ro.logps, plan, c, tok.pad_id, rng,
          pol.reference_logps if pol.ref_params is not None else pol.teacher_logps)
      if n_skipped:
        reasons = skip_reasons(ro, step_metrics)
        for reason, n in reasons.items():
          skipped[reason] += n
        logging.warning("[%s] iteration %d: %d of %d updates skipped (%s)", name, it + 1,
                        n_skipped, len(step_metrics),
                        ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())))
      t_iter = time.time() - t0
      d = diag_lib.rerank_diagnostics(
          ro.omega, ro.order, lengths=ro.lengths, token_logps=np.concatenate(ro.logps),
          token_entropies=np.concatenate(ro.entropies))
      gen_tokens = int(ro.lengths.sum())
      m = {
          "reward": float(total.mean()),
          **{f"reward/{k}": float(np.mean(v)) for k, v in comps.items() if k != "total"},
          "valid_rate": d["valid_rate"], "groups_kept": float(plan.keep.mean()),
          "response_length": d["mean_response_length"], "entropy": d["entropy"],
          "neg_logp": d["neg_logp"],
          "identity_rate": d["identity_rate"], "kendall_tau": d["kendall_tau"],
          "truncated_rate": float((~ro.finished).mean()),
          "loss": float(np.mean([x["loss"] for x in step_metrics])),
          "grad_norm": float(np.mean([x["grad_norm"] for x in step_metrics])),
          "clip_frac_high": float(np.mean([x["clip_frac_high"] for x in step_metrics])),
          "clip_frac_low": float(np.mean([x["clip_frac_low"] for x in step_metrics])),
          "approx_kl": float(np.mean([x["approx_kl"] for x in step_metrics])),
          **{k: float(np.mean([x[k] for x in step_metrics]))
             for k in ("kl_ref", "kl_teacher", "kl_teacher_k1") if k in step_metrics[0]},
          "lr": float(step_metrics[-1]["lr"]), "skipped_updates": n_skipped,
          "applied_updates": len(step_metrics) - n_skipped,
          "rollout_tokens_per_sec": gen_tokens / max(t_roll, 1e-9),
          "rollout_seconds": t_roll, "iteration_seconds": t_iter,
          "prompt_tokens": float(np.mean([len(p) for p in ro.prompts])),
      }
      if contexts is not None:
        m["context_seconds"] = t_ctx
      hist = [int(x) for x in d["top_input_position_hist"]]
      logger.write(it + 1, m)
      logging.info(
          "[%s] iter %d/%d reward %.3f (rank %.3f format %.3f) valid %.2f kept %.2f len %.0f "
          "ent %.2f identity %.2f tau %.2f top-pos %s invalid %s | rollout %.0f tok/s %.1fs, "
          "iter %.1fs",
          name, it + 1, c.iterations, m["reward"], m.get("reward/rank", 0.0),
          m.get("reward/format", 0.0), m["valid_rate"], m["groups_kept"],
          m["response_length"], m["entropy"], m["identity_rate"], m["kendall_tau"], hist,
          dict(collections.Counter(r for r in ro.reasons if r != "ok")),
          m["rollout_tokens_per_sec"], t_roll, t_iter)
      entry = {"iteration": it + 1, **{k: m[k] for k in (
          "reward", "valid_rate", "groups_kept", "identity_rate", "kendall_tau",
          "response_length", "entropy", "truncated_rate", "applied_updates", "approx_kl",
          "rollout_tokens_per_sec", "iteration_seconds", "rollout_seconds", "kl_ref",
          "kl_teacher", "kl_teacher_k1", "prompt_tokens", "context_seconds")
          if k in m}, "top_input_position_hist": hist}
      done = it + 1
      if c.eval_every and (done % c.eval_every == 0 or done == c.iterations):
        ev, md = _validation_eval(pol.tr.model(state["params"]), tok, data["validation"],
                                  data["items"], data["users"], sids, prompt_cfg, c,
                                  data.get("evidence"))
        logger.write(done, ev, kind="eval")
        logging.info("[%s] validation at iteration %d:\n%s", name, done, md)
        entry["validation"] = ev
      history.append(entry)
      if done % c.checkpoint_every == 0 or done == c.iterations:
        pol.manager.save(done, state, {"history": history, "skipped": skipped}, force=True)
  finally:
    logger.close()
    pol.manager.close()
  trained = history[start:] if start < len(history) else []
  report = {
      "iterations": c.iterations, "resumed_from": start, "skipped_updates": skipped,
      "algorithm": dataclasses.asdict(alg), "reward": c.reward, "shuffle": bool(c.shuffle),
      "wall_seconds": round(time.time() - t_stage, 1),
      "rollout_tokens_per_sec": (float(np.mean([h["rollout_tokens_per_sec"] for h in trained]))
                                 if trained else None),
      **{k: (float(np.mean([h[k] for h in trained])) if trained and k in trained[0] else None)
         for k in ("iteration_seconds", "rollout_seconds", "prompt_tokens", "context_seconds")},
      "history": history,
  }
  return pol.tr.model(state["params"]), report


def load_data(ctx, c, prompt_cfg):
  """Train and validation slates, items, users and the prompt's evidence of a stage's workdir."""
  data_dir = runner.artifact_dir(ctx.workdir, ctx.config, "data")
  legacy_dir = runner.artifact_dir(ctx.workdir, ctx.config, "legacy")
  train = slates_lib.load_split(legacy_dir, "train")
  if not len(train.get("slate", ())):
    raise UserError(f"no train slates in {legacy_dir}; use more data")
  val = slates_lib.load_split(legacy_dir, "validation", max_examples=c.val_examples, seed=c.seed)
  return {"train": train, "validation": val, "items": artifacts.load_items(data_dir),
          "users": artifacts.load_users(data_dir), "legacy_dir": legacy_dir,
          "evidence": evidence_lib.for_prompt(prompt_cfg, data_dir)}


def final_table(ctx, c, models, tok, data, sids, prompt_cfg, pairs=()):
  """Baselines and each model on the same seeded test slates, with diagnostics. `models`:
  {name: model, or (model, its own prompt config[, its own max_new_tokens])}; `pairs`: (row,
  row) pairs whose paired differences the table adds."""
  legacy_dir = data["legacy_dir"]
  slates = slates_lib.load_split(legacy_dir, c.eval_split, max_examples=c.eval_examples,
                                 seed=c.seed)
  if not len(slates.get("slate", ())):
    raise UserError(f"no {c.eval_split} slates in {legacy_dir}; use more data")
  popularity = np.load(os.path.join(legacy_dir, "popularity.npy"))
  rankers_dir = ctx.inputs["rankers"]
  rankers = compare.SIMPLE + tuple(scores_lib.names(rankers_dir, c.eval_split))
  # A model given as (model, prompt config[, budget]) re-ranks with its own prompt and budget
  # (e.g. reasoning-free).
  own = {name: m if isinstance(m, tuple) else (m,) for name, m in models.items()}
  result = compare.compare_models(
      slates, popularity,
      [(name, lambda m=m: (m[0], tok, sids, m[1] if len(m) > 1 else prompt_cfg, *m[2:]))
       for name, m in own.items()],
      items=data["items"], users=data["users"], rankers=rankers,
      seed=c.seed, n_boot=c.n_boot, max_new_tokens=c.max_new_tokens, batch_size=c.eval_batch,
      constrained=c.eval_constrained, log_prefix="rl",
      evidence=lambda _: data.get("evidence"), rankers_dir=rankers_dir, split=c.eval_split,
      pairs=pairs)
  md = (f"Re-ranking on {result['slates']} seeded {c.eval_split} slates:\n\n"
        + compare.models_markdown(result))
  if pairs:
    md += ("\n\nPaired differences on the same slates (95% paired bootstrap intervals):\n\n"
           + compare.paired_markdown(result["paired"]))
  out = {"split": c.eval_split, **result}
  # The baselines cost nothing to score on every slate of the split: their rows there show
  # how far the sampled slates above sit from the whole split.
  every = slates_lib.load_split(legacy_dir, c.eval_split)
  if len(every["slate"]) > result["slates"]:
    out["baselines_all_slates"] = {
        "slates": int(len(every["slate"])),
        "rows": compare.baseline_rows(every, popularity, rankers, c.seed, c.n_boot,
                                         rankers_dir, c.eval_split)}
    md += (f"\n\nThe baselines on all {len(every['slate'])} {c.eval_split} slates, for scale:"
           "\n\n" + tables.format_table(out["baselines_all_slates"]["rows"]))
  return out, md


def write_table(ctx, result, md, log_prefix):
  """`table.json` and `table.md` of a final table in the stage's folder, logged and printed."""
  ctx.write_json("table.json", result)
  ctx.write_text("table.md", md + "\n")
  logging.info("[%s] final table:\n%s", log_prefix, md)
  print(md)


def ablation_markdown(reports):
  """Per variant: first and last iteration's order-copying diagnostics and reward."""
  lines = ["| variant | reward | slate order | identity rate (first -> last 3 iters) | "
           "Kendall tau (first -> last 3) | valid rate (last 3) | mean reward (last 3) | "
           "validation R@1 (end) | validation identity (end) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, r in reports.items():
    h = r["history"]
    first, last = h[0], h[-3:]
    mean = lambda key: float(np.nanmean([x[key] for x in last]))  # pylint: disable=cell-var-from-loop
    val = next((x["validation"] for x in reversed(h) if "validation" in x), {})
    lines.append(
        f"| {name} | {r['reward']} | {'shuffled' if r['shuffle'] else 'fixed'} | "
        f"{first['identity_rate']:.3f} -> {mean('identity_rate'):.3f} | "
        f"{first['kendall_tau']:.3f} -> {mean('kendall_tau'):.3f} | {mean('valid_rate'):.3f} | "
        f"{mean('reward'):.3f} | {val.get('R@1', float('nan')):.4f} | "
        f"{val.get('identity_rate', float('nan')):.3f} |")
  return "\n".join(lines)
