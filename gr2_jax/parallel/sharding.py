"""Logical axis names and the one table that maps them to mesh axes.

Parameters carry logical axis names in their `out_sharding` metadata; activations are constrained
with `shard(x, ("batch", "length", "act_embed"))`. A rules table, a tuple of
`(logical_name, mesh_axis | tuple of mesh axes | None)` pairs, turns those names into
`PartitionSpec`s, so changing the parallelism of a run is a config change, never a model change.
The first rule that names a logical axis wins; a mesh axis already used by an earlier dimension
of the same array is dropped (one mesh axis can shard only one dimension).
"""

import contextlib
import contextvars

import jax
from flax import nnx
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gr2_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters: "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm".
# Activations: "batch", "length", "act_embed", "act_mlp", "act_heads", "act_kv_heads",
# "act_vocab". KV cache: "layers", "cache_batch", "cache_length".
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("cache_batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)

_ACTIVE = contextvars.ContextVar("gr2_sharding_active", default=None)


def normalize_rules(rules):
  """Validates a rules table (tuple/list of pairs, e.g. from a config) and returns a tuple."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for entry in rules:
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise UserError(
          f"sharding rule {entry!r} is not a (logical_axis, mesh_axis_or_None) pair")
    name, target = entry
    if isinstance(target, (list, tuple)):
      target = tuple(target)
      bad = [t for t in target if not isinstance(t, str)]
    else:
      bad = [] if target is None or isinstance(target, str) else [target]
    if bad:
      raise UserError(f"sharding rule for {name!r} names {bad!r}; use mesh axis names or None")
    out.append((name, target))
  return tuple(out)


def logical_to_spec(logical_axes, rules=None, mesh=None, shape=None):
  """Logical axis names of one array -> PartitionSpec under `rules`.

  Args:
    logical_axes: one name (or None) per dimension.
    rules: rules table; DEFAULT_RULES when None.
    mesh: when given, mesh axes it lacks are dropped (one table serves every mesh) and, with
      `shape`, so is a mesh axis that would not divide its dimension evenly (a batch of 1 while
      decoding, 2 KV heads on 4 tensor shards): that dimension is then replicated instead.
    shape: the array's shape, used with `mesh`.
  """
  mesh_sizes = dict(mesh.shape) if mesh is not None else None
  table = {}
  for name, target in normalize_rules(rules):
    table.setdefault(name, target)
  used = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    targets = target if isinstance(target, tuple) else (target,)
    kept = []
    ways = 1
    for t in targets:
      if t in used or (mesh_sizes is not None and t not in mesh_sizes):
        continue
      if mesh_sizes is not None and shape is not None:
        if shape[dim] % (ways * mesh_sizes[t]):
          continue
        ways *= mesh_sizes[t]
      kept.append(t)
    kept = tuple(kept)
    used.update(kept)
    if not kept:
      spec.append(None)
    elif len(kept) == 1:
      spec.append(kept[0])
    else:
      spec.append(kept)
  return P(*spec)


def param_logical_axes(state):
  """State of Variables -> same-structured tree of their logical axis tuples."""
  return jax.tree.map(
      lambda v: tuple(v.get_metadata("out_sharding", None) or (None,) * v.ndim),
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_specs(state, rules=None, mesh=None):
  """State of Variables -> same-structured tree of PartitionSpecs (Variables' values)."""

  def spec(v):
    axes = v.get_metadata("out_sharding", None) or (None,) * v.ndim
    return v.replace(logical_to_spec(axes, rules, mesh, v.shape))

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state, mesh, rules=None):
  """State of Variables -> same-structured tree of NamedShardings on `mesh`."""
  specs = state_specs(state, rules, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


@contextlib.contextmanager
def use_rules(mesh, rules=None):
  """Activates `mesh` (jax.set_mesh) and `rules` for `shard` while tracing the model."""
  token = _ACTIVE.set((mesh, normalize_rules(rules)))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE.reset(token)


@contextlib.contextmanager
def no_rules():
  """Leaves `use_rules` for a while: no mesh in context and `shard` a no-op, for single-device
  work inside a stage's runtime (the SASRec baseline, data-side models)."""
  token = _ACTIVE.set(None)
  try:
    with jax.set_mesh(None):
      yield
  finally:
    _ACTIVE.reset(token)


def active_rules():
  """(mesh, rules) set by `use_rules`, or None outside it."""
  return _ACTIVE.get()


def to_host(tree):
  """`tree` with every array that spans other processes' devices gathered (numpy, the whole
  array on every process), so results of a multi-host computation can be read; other leaves
  are returned as they are (one process: the tree itself)."""
  if jax.process_count() == 1:
    return tree

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.process_allgather(x, tiled=True)
    return x

  return jax.tree.map(one, tree)


def process_box(sharding, shape):
  """The part of a global array of `shape` that this process's devices hold under `sharding`:
  one slice per dimension (the whole dimension where the process holds every index of it).

  Host-local data fed to `make_global` is this box of the global array. Raises ValueError when
  the process's devices hold no single box (a mesh whose device order interleaves processes).
  """
  held = list(sharding.addressable_devices_indices_map(tuple(shape)).values())
  box = []
  for d, n in enumerate(shape):
    spans = sorted({(s[d].start or 0, n if s[d].stop is None else s[d].stop) for s in held})
    lo, hi = spans[0]
    for a, b in spans[1:]:
      if a > hi:
        raise ValueError(f"process {jax.process_index()} holds no single box of {tuple(shape)} "
                         f"under {sharding} (dimension {d}: gap at {hi}..{a})")
      hi = max(hi, b)
    box.append(slice(lo, hi))
  return tuple(box)


def make_global(local, sharding, shape):
  """The global array of `shape` under `sharding` from this process's `process_box` of it
  (`local`): each process transfers only what its own devices hold."""
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  local = np.asarray(local)
  local = local.astype(jax.dtypes.canonicalize_dtype(local.dtype), copy=False)
  return jax.make_array_from_process_local_data(sharding, local, tuple(shape))


def put_global(x, sharding):
  """`x` (the same whole array on every process) placed under `sharding`, each process moving
  only its `process_box` of it to its devices."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  return make_global(x[process_box(sharding, x.shape)], sharding, x.shape)


def shard(x, logical_axes):
  """Constrains an activation's sharding by logical names; a no-op outside `use_rules`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(logical_axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
