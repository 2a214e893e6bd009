"""OPD stage: on-policy distillation of a student toward a frozen teacher (configs/opd.py).

The student rolls out on the RL stage's training slates (its sampler, rewards, group
advantages and guards: `rl.loop.train_policy`); each update's loss is `losses.opd` with the
teacher's log-probs computed in the same jitted pass (`learner.make_opd_step`). Artifact: the
student laid out as an sft/rl artifact (`eval.checkpoints` takes it), `train/` (checkpoints,
`tb/` with kl_teacher per iteration), `table.json` / `table.md` (baselines, teacher, student
before and after OPD on the RL stage's test slates, with each model's re-ranking seconds: the
decode speed-up), `report.json`.
"""

import os
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp

from gr2_jax import runner
from gr2_jax.distill import prune as prune_lib
from gr2_jax.errors import UserError
from gr2_jax.parallel import runtime as runtime_lib
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.rl import learner
from gr2_jax.rl import loop


def _student(ctx, c, teacher, teacher_tok, rt):
  if c.recipe == "pruned":
    keep = prune_lib.layers_to_keep(c.keep_layers, teacher.cfg.num_layers)
    logging.info("[opd] pruned student keeps layers %s of %d", keep, teacher.cfg.num_layers)
    return prune_lib.prune(teacher, keep, rt.mesh, rt.rules), teacher_tok, keep
  if c.recipe == "sft_replacement":
    path = runner.artifact_dir(ctx.workdir, ctx.config, "midtrain")
    student, tok = rt.load(path)
    return student, tok, list(range(student.cfg.num_layers))
  raise UserError(f"opd.recipe must be pruned or sft_replacement, got {c.recipe!r}")


def run(ctx):
  c = ctx.section
  loop.check_config(c)
  t_start = time.time()
  rl_dir = ctx.inputs["rl"]
  if c.recipe not in ("pruned", "sft_replacement"):
    raise UserError(f"opd.recipe must be pruned or sft_replacement, got {c.recipe!r}")
  if c.teacher not in ("rl", "sft"):
    raise UserError(f"opd.teacher must be rl or sft, got {c.teacher!r}")
  teacher_dir = rl_dir if c.teacher == "rl" else runner.artifact_dir(ctx.workdir, ctx.config,
                                                                      "sft")
  if c.teacher_devices:
    if c.kl_estimator == "full":
      raise UserError("opd.teacher_devices needs kl_estimator k1 or k3: the exact KL reads the "
                      "teacher's logits inside the student's pass")
    rt, teacher_rt = runtime_lib.split_for_stage(ctx, c.teacher_devices)
  else:
    rt = teacher_rt = runtime_lib.for_stage(ctx)
  logging.info("[opd] student: %s; teacher: %s", runtime_lib.describe(rt),
               runtime_lib.describe(teacher_rt))
  with rt.activate():
    return _run(ctx, c, rt, teacher_rt, teacher_dir, t_start)


def _run(ctx, c, rt, teacher_rt, teacher_dir, t_start):
  rl_dir = ctx.inputs["rl"]
  teacher, tok = teacher_rt.load(teacher_dir)
  student, student_tok, keep = _student(ctx, c, teacher, tok, rt)
  learner.check_teacher(student.cfg, teacher.cfg, student_tok, tok)
  prompt_cfg, sids = rerank_lib.load_rerank_info(rl_dir)
  data = loop.load_data(ctx, c, prompt_cfg)
  t_graphdef, t_state = nnx.split(teacher)
  # The student as it starts, for the table (a copy: training donates the student's buffers).
  s_graphdef, s_state = nnx.split(student)
  before = nnx.merge(s_graphdef, jax.tree.map(jnp.copy, s_state))
  model, train_report = loop.train_policy(
      ctx, c, "train", student, tok, data, sids, prompt_cfg, rt,
      teacher=(t_graphdef, nnx.to_pure_dict(t_state),
               teacher_rt.mesh if c.teacher_devices else None))
  rt.save(ctx.out_dir, model, tok)
  for name in (rerank_lib.PROMPT_FILE, rerank_lib.SID_TABLE_FILE):
    ctx.copy_in(os.path.join(rl_dir, name))
  report = {"recipe": c.recipe, "teacher": teacher_dir, "kept_layers": keep,
            "teacher_layers": teacher.cfg.num_layers, "student_layers": model.cfg.num_layers}
  report.update({k: train_report[k] for k in (
      "iterations", "resumed_from", "skipped_updates", "algorithm", "rollout_tokens_per_sec",
      "iteration_seconds", "wall_seconds")})
  report["kl_curve"] = [{"iteration": h["iteration"], "kl_teacher": h.get("kl_teacher"),
                         "kl_teacher_k1": h.get("kl_teacher_k1")} for h in train_report["history"]]
  if c.eval_examples:
    t0 = time.time()
    # Every model of the table decodes on the student's devices (the active mesh).
    models = {"teacher": rt.place(teacher) if c.teacher_devices else teacher,
              "student (before)": before, "opd": model}
    result, md = loop.final_table(ctx, c, models, tok, data, sids, prompt_cfg)
    secs = result["seconds"]
    result["decode_speedup"] = {name: secs["teacher"] / secs[name] for name in secs
                                if secs.get(name)}
    loop.write_table(ctx, result, md, "opd")
    report["eval_seconds"] = round(time.time() - t0, 1)
    report["table"] = {n: {"R@1": r["R@1"]["mean"], "R@1_lift": r.get("lift", {}).get("R@1")}
                       for n, r in result["rows"].items()}
    report["valid_rate"] = {n: d["valid_rate"] for n, d in result["diagnostics"].items()}
    report["rerank_seconds"] = secs
    report["decode_speedup"] = result["decode_speedup"]
    # Per decoding mode: the student's R@1 gain over legacy as a share of the teacher's.
    report["share_of_teacher_lift_kept"] = {}
    diags = result["diagnostics"]
    report["answer_tokens_per_sec"] = {
        name: sum(d.get("mean_response_length", 0.0) * d["num_rollouts"]
                  for row, d in diags.items() if row.startswith(name)) / secs[name]
        for name in secs if secs.get(name)}
    for cons in (False, True):
      t, o = rerank_lib.row_name("teacher", cons), rerank_lib.row_name("opd", cons)
      lift = {n: report["table"].get(n, {}).get("R@1_lift") or {} for n in (t, o)}
      if lift[t].get("diff"):
        report["share_of_teacher_lift_kept"][o] = lift[o].get("diff", 0.0) / lift[t]["diff"]
  report["wall_seconds"] = round(time.time() - t_start, 1)
  ctx.write_json("report.json", report)
  return {k: report[k] for k in ("recipe", "kept_layers", "wall_seconds") if k in report}
