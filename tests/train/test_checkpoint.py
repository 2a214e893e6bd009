"""Tests of the orbax checkpoint wrapper: resharding restores, keep-N, resume, crashes."""

import os

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.train import checkpoint as ckpt


def _mesh(shape, names):
  devices = np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def _state(mesh8):
  w = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4)
  b = jnp.arange(16, dtype=jnp.bfloat16)
  return {
      "w": jax.device_put(w, NamedSharding(mesh8, P("x", None))),
      "nested": {"b": jax.device_put(b, NamedSharding(mesh8, P("x"))),
                 "step": jnp.int32(7)},
  }


def test_save_on_8_restore_on_2x4_and_on_one_device(tmp_path):
  mesh8 = _mesh((8,), ("x",))
  state = _state(mesh8)
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    mgr.save(10, state, {"iterator": {"epoch": 1, "index": 42}})

  mesh24 = _mesh((2, 4), ("data", "model"))
  targets = {
      "w": NamedSharding(mesh24, P("model", "data")),
      "nested": {"b": NamedSharding(mesh24, P(("data", "model"))),
                 "step": NamedSharding(mesh24, P())},
  }
  one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    for shardings in (targets, jax.tree.map(lambda _: one, targets)):
      restored, meta = mgr.restore(ckpt.abstract_like(state, shardings))
      assert meta == {"step": 10, "iterator": {"epoch": 1, "index": 42}}
      for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                                     jax.tree.leaves(shardings)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
    # On the (2, 4) mesh "w" [8, 4] is split 4 ways on rows and 2 ways on columns.
    restored, _ = mgr.restore(ckpt.abstract_like(state, targets))
    assert restored["w"].addressable_shards[0].data.shape == (2, 2)


def test_keep_n_and_resume_latest(tmp_path):
  mesh8 = _mesh((8,), ("x",))
  state = _state(mesh8)
  with ckpt.CheckpointManager(str(tmp_path), max_to_keep=2) as mgr:
    for step in (1, 2, 3, 4):
      mgr.save(step, jax.tree.map(lambda x, s=step: x + s, state), {"seen": step * 100})
  assert sorted(os.listdir(tmp_path)) == ["3", "4"]
  with ckpt.CheckpointManager(str(tmp_path), max_to_keep=2) as mgr:
    assert mgr.latest_step() == 4 and mgr.all_steps() == [3, 4]
    restored, meta = mgr.restore(state)
    assert meta == {"step": 4, "seen": 400}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]) + 4)
    restored, meta = mgr.restore(state, step=3)
    assert meta["seen"] == 300
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]) + 3)


def test_interrupted_saves_are_ignored(tmp_path):
  mesh8 = _mesh((8,), ("x",))
  state = _state(mesh8)
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    mgr.save(5, state, {"seen": 5})
  # A crash during orbax's temporary write, and a step folder without its commit file.
  os.makedirs(tmp_path / "6.orbax-checkpoint-tmp-1700000000" / "state")
  os.makedirs(tmp_path / "7" / "state")
  (tmp_path / "7" / "state" / "partial").write_bytes(b"\0" * 10)
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    assert mgr.latest_step() == 5
    restored, meta = mgr.restore(state)
    assert meta["seen"] == 5
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    # Step 7 can be written again after the broken folder was cleared.
    mgr.save(7, state, {"seen": 7})
  assert sorted(os.listdir(tmp_path)) == ["5", "7"]


def test_missing_and_mismatched_checkpoints_are_user_errors(tmp_path):
  mesh8 = _mesh((8,), ("x",))
  state = _state(mesh8)
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    with pytest.raises(UserError, match="no checkpoint in"):
      mgr.restore(state)
    mgr.save(1, state)
    mgr.wait_until_finished()
    with pytest.raises(UserError, match="no checkpoint for step 2"):
      mgr.restore(state, step=2)
    with pytest.raises(UserError, match="does not match"):
      mgr.restore({"other": jnp.zeros((3,))})


def test_model_state_round_trip_onto_other_sharding(tmp_path):
  model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
  want = {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(model, nnx.Param)).items()}
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    ckpt.save_model_state(mgr, 3, model, {"tokens": 123})

  # Restore into an abstract model with the kernel split over a (2, 4) mesh.
  abstract = nnx.eval_shape(lambda: nnx.Linear(4, 8, rngs=nnx.Rngs(1)))
  mesh = _mesh((2, 4), ("data", "model"))
  shardings = {"kernel": NamedSharding(mesh, P("data", "model")),
               "bias": NamedSharding(mesh, P("model"))}
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    meta = ckpt.restore_model_state(mgr, abstract, shardings=shardings)
  assert meta == {"step": 3, "tokens": 123}
  np.testing.assert_array_equal(np.asarray(abstract.kernel[...]), want["kernel"])
  np.testing.assert_array_equal(np.asarray(abstract.bias[...]), want["bias"])
  assert abstract.kernel[...].sharding.spec == P("data", "model")
  x = jnp.ones((2, 4))
  np.testing.assert_allclose(np.asarray(abstract(x)), np.asarray(model(x)), rtol=1e-6)


def test_metadata_is_copied_when_the_save_starts(tmp_path):
  counts = {"a": 1.0}
  history = [0.5]
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    mgr.save(1, {"w": jnp.ones(3)}, {"counts": counts, "history": history})
    counts["a"] = 99.0  # the caller keeps mutating while the async save is in flight
    history.append(0.25)
    mgr.wait_until_finished()
    _, meta = mgr.restore({"w": jnp.zeros(3)})
  assert meta == {"step": 1, "counts": {"a": 1.0}, "history": [0.5]}
