"""Checkpoints: a thin wrapper around orbax's CheckpointManager.

A checkpoint at step N is a folder `<directory>/<N>/` holding a pytree of arrays ("state") and a
JSON document ("meta": the step, the data iterator's state, anything JSON-able). Saves are
asynchronous: `save` returns once the arrays are copied off the device and the files are written
in the background; `close` (or leaving the `with` block) waits for them.

Restores take an abstract target (a tree of `jax.ShapeDtypeStruct` with shardings) and read each
array straight onto its shards, so a checkpoint written on one mesh restores onto any other.

A run killed mid-save leaves either orbax's temporary folder (`<N>.orbax-checkpoint-tmp-*`) or,
on file systems without atomic renames, a step folder without orbax's commit metadata. Both are
ignored and removed when the manager opens, so resuming picks the last complete step.
"""

import json
import os
import shutil
from typing import Any, Optional

from absl import logging
from flax import nnx
import jax
import orbax.checkpoint as ocp

from gr2_jax.errors import UserError
from gr2_jax.parallel import distributed

_STATE = "state"
_META = "meta"
_COMMIT_FILE = "_CHECKPOINT_METADATA"  # written by orbax when a step is finalised
_OPENED = {}  # directory -> managers opened on it in this process (unique barrier names)


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) with `shardings` or their own."""
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _is_complete(step_dir):
  return (os.path.isfile(os.path.join(step_dir, _COMMIT_FILE))
          and os.path.isdir(os.path.join(step_dir, _STATE))
          and os.path.isdir(os.path.join(step_dir, _META)))


class CheckpointManager:
  """Saves and restores (state pytree, JSON metadata) by step; keeps the last `max_to_keep`."""

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3,
               async_save: bool = True, save_interval_steps: int = 1):
    self.directory = os.path.abspath(directory)
    if jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      self._remove_incomplete()
    # The other processes of a multi-host run look only once process 0 has cleaned up.
    _OPENED[self.directory] = _OPENED.get(self.directory, 0) + 1
    distributed.barrier(f"ckpt-open:{self.directory}:{_OPENED[self.directory]}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def _remove_incomplete(self):
    for name in os.listdir(self.directory):
      path = os.path.join(self.directory, name)
      if not os.path.isdir(path):
        continue
      if ".orbax-checkpoint-tmp" in name or (name.isdigit() and not _is_complete(path)):
        logging.warning("removing incomplete checkpoint %s (a save was interrupted)", path)
        shutil.rmtree(path)

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, metadata: Optional[dict] = None, *,
           force: bool = False) -> bool:
    """Starts saving `state` and `metadata` (+ "step") at `step`; False if the interval skips it."""
    # A JSON round trip copies the metadata now: async saves serialise it later, and callers keep
    # mutating their dicts (token counters, loss history) while the save is in flight.
    meta = json.loads(json.dumps({"step": int(step), **(metadata or {})}))
    return self._manager.save(
        int(step), args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}),
        force=force)

  def restore(self, target: Any, step: Optional[int] = None):
    """Returns (state, metadata) of `step` (default: the latest) laid out as `target`.

    `target` is a pytree of ShapeDtypeStructs with shardings (or of arrays, whose shardings
    are used); see `abstract_like`.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise UserError(f"no checkpoint in {self.directory}; train first or check the path")
    elif step not in self.all_steps():
      raise UserError(f"no checkpoint for step {step} in {self.directory}; "
                      f"available steps: {self.all_steps()}")
    target = abstract_like(target)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"checkpoint {self.directory}/{step} does not match the restore target "
                      f"(was it written by another model config?): {e}") from None
    return out[_STATE], dict(out[_META])

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def save_model_state(manager: CheckpointManager, step: int, model: nnx.Module,
                     metadata: Optional[dict] = None, *, state_filter=nnx.Param,
                     force: bool = False) -> bool:
  """Saves the model's variables selected by `state_filter` (default: parameters)."""
  state = nnx.to_pure_dict(nnx.state(model, state_filter))
  return manager.save(step, state, metadata, force=force)


def restore_model_state(manager: CheckpointManager, model: nnx.Module,
                        step: Optional[int] = None, *, shardings=None,
                        state_filter=nnx.Param) -> dict:
  """Restores the model's variables in place (onto their current shardings unless given).

  `model` may be abstract (from `nnx.eval_shape`) when `shardings` says where arrays go.
  Returns the checkpoint's metadata.
  """
  state = nnx.state(model, state_filter)
  target = abstract_like(nnx.to_pure_dict(state), shardings)
  restored, meta = manager.restore(target, step)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return meta
