"""Train step: token-normalised accumulation, AdamW update, sharding, resume after kills."""

import os
import signal

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.train import optim
from gr2_jax.train import packing
from gr2_jax.train import trainer as trainer_lib

VOCAB = 32


CFG = qwen3.get_model_config("tiny", vocab_size=VOCAB, num_layers=1, hidden_size=32,
                             mlp_dim=64, num_heads=2, num_kv_heads=1)


def _model(seed=0):
  return mesh_lib.create_sharded_model(CFG, mesh_lib.single_device_mesh(), seed=seed)


def _rows(n, seq_len=8, seed=0):
  rng = np.random.default_rng(seed)
  ex = []
  for _ in range(n):
    length = int(rng.integers(2, seq_len + 1))
    ex.append((rng.integers(1, VOCAB, length), rng.integers(0, 3, length).astype(np.float32)))
  return packing.pack(ex, seq_len, tasks=[i % 2 for i in range(n)])


def _stack(rows, sl_list):
  return {k: np.stack([rows[k][sl] for sl in sl_list]) for k in trainer_lib.DEVICE_FIELDS}


def test_accumulation_is_normalised_by_tokens_not_micro_batches():
  model = _model()
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  rows = _rows(12)
  # Micro-batches of 2 rows with different token weights; the whole batch as one.
  a, b = slice(0, 2), slice(2, 4)
  assert rows["weights"][a].sum() != rows["weights"][b].sum()
  f = jax.jit(lambda p, x: trainer_lib.accumulated_grads(graphdef, p, x))
  loss_acc, g_acc = f(params, _stack(rows, [a, b]))
  loss_one, g_one = f(params, _stack(rows, [slice(0, 4)]))
  np.testing.assert_allclose(loss_acc, loss_one, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_one)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)
  # And the loss is the weighted mean token NLL computed by hand.
  logits = jax.jit(lambda p, t, q, s: qwen3.apply(graphdef, p, t, q, segment_ids=s)[0])(
      params, rows["tokens"][:4], rows["positions"][:4], rows["segment_ids"][:4])
  logp = np.asarray(jax.nn.log_softmax(logits))
  nll = -np.take_along_axis(logp, rows["targets"][:4, :, None], -1)[..., 0]
  w = rows["weights"][:4]
  np.testing.assert_allclose(loss_one, (nll * w).sum() / w.sum(), rtol=1e-5)



@pytest.mark.parametrize("loss_chunk", [3, 8])
def test_chunked_loss_gradient_equals_the_full_logits_one(loss_chunk):
  """Chunks of 3 positions (the last one padded) or one chunk of 8: the loss and gradient of
  the weighted NLL computed from full [B, T, V] logits."""
  graphdef, state = nnx.split(_model(seed=1))
  params = nnx.to_pure_dict(state)
  rows = _rows(12)
  batch = _stack(rows, [slice(0, 2), slice(2, 4)])

  def full_logits_loss(p):
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    logits, _ = qwen3.apply(graphdef, p, flat["tokens"], flat["positions"],
                            segment_ids=flat["segment_ids"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, flat["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * flat["weights"]) / jnp.sum(flat["weights"])

  want_loss, want = jax.jit(jax.value_and_grad(full_logits_loss))(params)
  loss, got = jax.jit(lambda p, x: trainer_lib.accumulated_grads(graphdef, p, x, loss_chunk))(
      params, batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_step_applies_clipped_adamw_on_an_8_device_mesh():
  model = _model()
  mesh = mesh_lib.make_mesh((2, 2, 2))
  ocfg = optim.OptimConfig(learning_rate=0.01, warmup_steps=0, total_steps=10,
                           weight_decay=0.1, clip_norm=0.5)
  tcfg = trainer_lib.TrainerConfig(num_steps=1, peak_flops=1e9)
  tr = trainer_lib.Trainer(model, ocfg, tcfg, mesh=mesh, workdir="/nonexistent")
  rows = _rows(40)
  batch = _stack(rows, [slice(0, 4)])
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  _, grads = jax.jit(lambda p, x: trainer_lib.accumulated_grads(graphdef, p, x))(params, batch)
  tx = optim.make_optimizer(ocfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = optax.apply_updates(params, updates)
  new_state, metrics = tr._step(tr.init_state(), batch)  # pylint: disable=protected-access
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
  assert int(new_state["step"]) == 1
  for x, y in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=5e-5)
  emb = new_state["params"]["embed_tokens"]["embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def _run(workdir, num_steps, on_step=None, seen=None, frozen_layers=0):
  mesh = mesh_lib.single_device_mesh()
  ocfg = optim.OptimConfig(learning_rate=0.01, warmup_steps=2, total_steps=num_steps,
                           frozen_layers=frozen_layers)
  tcfg = trainer_lib.TrainerConfig(num_steps=num_steps, micro_batches=2, log_every=1,
                                   checkpoint_every=2, peak_flops=1e9, task_names=("a", "b"))
  tr = trainer_lib.Trainer(_model(), ocfg, tcfg, mesh=mesh, workdir=workdir)
  ds = trainer_lib.batch_dataset(_rows(24), batch_size=2, micro_batches=2, seed=5)

  def record(step):
    if seen is not None:
      seen.append(step)
    if on_step is not None:
      on_step(step)

  return tr.fit(ds, on_step=record)


class Killed(Exception):
  pass


def _killed_at(workdir, num_steps, at, **kw):
  """Runs `_run` until step `at` finishes, then raises as a hard kill would."""

  def kill(step):
    if step == at:
      raise Killed()

  with pytest.raises(Killed):
    _run(workdir, num_steps, on_step=kill, **kw)


def test_killed_and_preempted_runs_resume_exactly(tmp_path):
  ref, ref_summary = _run(str(tmp_path / "ref"), 7)

  # A hard kill after step 5 (checkpoints every 2 steps): resumes at 4, redoes step 5.
  work = str(tmp_path / "killed")
  _killed_at(work, 7, 5)
  seen = []
  out, summary = _run(work, 7, seen=seen)
  assert summary["resumed_from"] == 4 and seen == [5, 6, 7]
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(x, y)
  assert summary["task_tokens"] == ref_summary["task_tokens"]
  assert [h["loss"] for h in summary["loss_history"]] == [
      h["loss"] for h in ref_summary["loss_history"]]

  # SIGTERM during step 3: the step finishes, is saved, and the run stops.
  def term(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  work = str(tmp_path / "term")
  with pytest.raises(trainer_lib.Preempted):
    _run(work, 7, on_step=term)
  seen = []
  out, summary = _run(work, 7, seen=seen)
  assert summary["resumed_from"] == 3 and seen == [4, 5, 6, 7]
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(x, y)
  assert os.path.isdir(os.path.join(work, "tb"))


def test_frozen_layers_stay_fixed_and_the_rest_takes_the_masked_adamw_step():
  cfg = qwen3.get_model_config("tiny", vocab_size=VOCAB, num_layers=3, hidden_size=32,
                               mlp_dim=64, num_heads=2, num_kv_heads=1)
  model = mesh_lib.create_sharded_model(cfg, mesh_lib.single_device_mesh(), seed=2)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  ocfg = optim.OptimConfig(learning_rate=0.01, warmup_steps=0, total_steps=10,
                           weight_decay=0.1, clip_norm=0.5, frozen_layers=2)
  tr = trainer_lib.Trainer(model, ocfg, trainer_lib.TrainerConfig(num_steps=1, peak_flops=1e9),
                           mesh=mesh_lib.single_device_mesh(), workdir="/nonexistent")
  batch = _stack(_rows(12), [slice(0, 4)])
  # The reference: the full model's gradient with the frozen leaves zeroed, then plain AdamW
  # with clipping (on the zeroed gradient) and weight decay applied to the trainable leaves.
  _, grads = jax.jit(lambda p, x: trainer_lib.accumulated_grads(graphdef, p, x))(params, batch)
  frozen = optim.frozen_mask(params, 2)
  assert frozen["embed_tokens"]["embedding"] and not frozen["norm"]["weight"]
  assert all(jax.tree.leaves(frozen["layers"][1])) and not any(jax.tree.leaves(frozen["layers"][2]))
  grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=0.01, warmup_steps=0, total_steps=10,
                                              weight_decay=0.1, clip_norm=0.5))
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = optax.apply_updates(params, updates)
  params = jax.tree.map(np.array, params)  # the step donates the buffers it shares
  init = tr.init_state()
  # No AdamW moments for the frozen parameters: mu holds the trainable leaves only.
  n_state = sum(x.size for x in jax.tree.leaves(init["opt_state"]))
  n_train = sum(x.size for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)) if not f)
  assert n_state == 2 * n_train + 2  # mu, nu and two step counters
  new_state, metrics = tr._step(init, batch)  # pylint: disable=protected-access
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
  for (path, x), y, p, f in zip(jax.tree_util.tree_leaves_with_path(new_state["params"]),
                                jax.tree.leaves(expected), jax.tree.leaves(params),
                                jax.tree.leaves(frozen)):
    if f:
      np.testing.assert_array_equal(x, p, err_msg=str(path))
    else:
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=5e-5, err_msg=str(path))
      assert not np.array_equal(x, p), path


def test_frozen_run_resumes_exactly(tmp_path):
  ref, _ = _run(str(tmp_path / "ref"), 4, frozen_layers=1)
  work = str(tmp_path / "killed")
  _killed_at(work, 4, 3, frozen_layers=1)
  out, summary = _run(work, 4, frozen_layers=1)
  assert summary["resumed_from"] == 2
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(out["embed_tokens"]["embedding"],
                                nnx.to_pure_dict(nnx.state(_model()))["embed_tokens"]["embedding"])


def test_frozen_layers_beyond_the_model_is_a_clear_error():
  with pytest.raises(Exception, match="frozen_layers=2 but the model has 1 decoder layers"):
    trainer_lib.Trainer(_model(), optim.OptimConfig(frozen_layers=2),
                        trainer_lib.TrainerConfig(num_steps=1, peak_flops=1e9),
                        mesh=mesh_lib.single_device_mesh(), workdir="/nonexistent")


def test_batch_dataset_boxes_gather_that_part_of_each_global_batch():
  """A process's part of a batch (rows 1..3 of 4, positions 2..8) equals that slice of the
  whole batch, step after step; host-side fields follow the rows."""
  rows = dict(_rows(24), task=np.arange(24) % 2)
  whole = trainer_lib.batch_dataset(rows, batch_size=4, micro_batches=2, seed=3)
  box = (slice(0, 2), slice(1, 3))
  boxes = {k: box + ((slice(2, 8),) if v.ndim > 1 else ()) for k, v in rows.items()}
  part = trainer_lib.batch_dataset(rows, batch_size=4, micro_batches=2, seed=3, boxes=boxes)
  a, b = iter(whole.to_iter_dataset()), iter(part.to_iter_dataset())
  for _ in range(8):  # more than one pass over the 24 rows
    x, y = next(a), next(b)
    assert set(y) == set(rows)
    for k in rows:
      np.testing.assert_array_equal(y[k], x[k][boxes[k]])
