"""The model runtime: one object, made from the `runtime` config section that every model stage
shares, that owns the device mesh, the logical-axis rules, the numerics (parameter and compute
dtype, remat) and the building, loading and saving of models on that mesh.

  --config.runtime.mesh="(2,2,2)"            # (data, fsdp, tensor); -1 takes the devices left
  --config.runtime.rules="('embed=fsdp+data', 'vocab=')"   # put before the default table
  --config.runtime.dtype=bfloat16 --config.runtime.param_dtype=float32 --config.runtime.remat=True

Going from a data-parallel float32 run on a CPU to an FSDP x tensor-parallel bfloat16 run on a
pod is a change of these fields, never of a stage. Stages do
`rt = runtime.for_stage(ctx)` and run their model work inside `with rt.activate():`, where
`gr2_jax.parallel.sharding.shard` constrains activations (the trainer, the RL step, the sampler
and beam search all trace there).
"""

import dataclasses
import json

import jax
import ml_collections
from absl import logging
from flax import nnx

from gr2_jax.errors import UserError
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.parallel import sharding as sharding_lib

DTYPES = ("float32", "bfloat16", "float16")
# Logical axis names the rules table may name (gr2_jax.parallel.sharding.DEFAULT_RULES).
LOGICAL_AXES = tuple(name for name, _ in sharding_lib.DEFAULT_RULES)


def section():
  """The `runtime` config section (composed into every stage's config)."""
  c = ml_collections.ConfigDict()
  # Mesh over (data, fsdp, tensor); -1 takes the devices the others leave. The devices are
  # the stage's `num_devices` (0 = all) of every process.
  c.mesh = (-1, 1, 1)
  # Rules put before the default table (the first rule naming a logical axis wins), each
  # "logical=mesh_axis[+mesh_axis...]", or "logical=" to replicate that axis.
  c.rules = ()
  c.dtype = "float32"  # compute dtype of the model's matmuls
  c.param_dtype = "float32"  # master weights (and the saved checkpoints)
  c.remat = False  # recompute each layer's activations in the backward pass
  return c


def parse_rules(entries):
  """("embed=fsdp+data", "vocab=") -> (("embed", ("fsdp", "data")), ("vocab", None)), checked."""
  if isinstance(entries, str):
    entries = (entries,) if entries else ()
  out = []
  for entry in entries:
    if not isinstance(entry, str) or "=" not in entry:
      raise UserError(f"runtime.rules entry {entry!r} is not 'logical_axis=mesh_axis[+...]'")
    name, target = (s.strip() for s in entry.split("=", 1))
    if name not in LOGICAL_AXES:
      raise UserError(f"runtime.rules entry {entry!r}: unknown logical axis {name!r}; known: "
                      f"{', '.join(LOGICAL_AXES)}")
    axes = tuple(a.strip() for a in target.split("+") if a.strip())
    bad = [a for a in axes if a not in sharding_lib.MESH_AXES]
    if bad:
      raise UserError(f"runtime.rules entry {entry!r}: unknown mesh axis {bad[0]!r}; mesh axes: "
                      f"{', '.join(sharding_lib.MESH_AXES)}")
    out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out) + sharding_lib.DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class Runtime:
  """Mesh, rules and numerics of a run's models (see the module docstring)."""
  mesh: jax.sharding.Mesh
  rules: tuple = sharding_lib.DEFAULT_RULES
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise UserError(f"runtime.{name}={getattr(self, name)!r} must be one of "
                        f"{', '.join(DTYPES)}")

  @property
  def numerics(self):
    return {"dtype": self.dtype, "param_dtype": self.param_dtype, "remat": bool(self.remat)}

  def activate(self):
    """Context in which `shard()` constrains activations by the rules on this mesh."""
    return sharding_lib.use_rules(self.mesh, self.rules)

  def model_config(self, cfg):
    """`cfg` (a qwen3.ModelConfig) with this runtime's numerics."""
    return dataclasses.replace(cfg, **self.numerics)

  def _abstract(self, cfg):
    """(graphdef, abstract state) of a model of shape `cfg` in this runtime's numerics."""
    from gr2_jax.models import qwen3  # pylint: disable=g-import-not-at-top  (models import parallel)
    cfg = self.model_config(cfg)
    return mesh_lib.abstract_model(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))

  def param_specs(self, cfg):
    """{"layers/0/mlp/up_proj/kernel": PartitionSpec, ...} of a model of shape `cfg` under this
    runtime's mesh and rules, computed without allocating the model (the sharding plan)."""
    _, abstract = self._abstract(cfg)
    specs = sharding_lib.state_specs(abstract, self.rules, self.mesh)
    return {"/".join(str(k) for k in path): v.get_value() for path, v in nnx.to_flat_state(specs)}

  def undivided(self, cfg):
    """[(param path, dimension, logical axis, mesh axes)] of the parameter dimensions the rules
    would shard but the mesh does not divide: those stay replicated."""
    _, abstract = self._abstract(cfg)
    out = []
    for path, var in nnx.to_flat_state(abstract):
      axes = var.get_metadata("out_sharding", None) or (None,) * var.ndim
      want = sharding_lib.logical_to_spec(axes, self.rules, self.mesh)
      got = sharding_lib.logical_to_spec(axes, self.rules, self.mesh, var.shape)
      for dim, (w, g) in enumerate(zip(want, got)):
        if w != g and w is not None:
          out.append(("/".join(map(str, path)), var.shape[dim], axes[dim], w))
    return out

  def warn_undivided(self, cfg):
    """Logs one line when the mesh leaves some parameter dimensions replicated."""
    bad = self.undivided(cfg)
    if bad:
      path, size, axis, mesh_axes = bad[0]
      ways = {a: self.mesh.shape[a] for a in (mesh_axes if isinstance(mesh_axes, tuple)
                                              else (mesh_axes,))}
      logging.warning("runtime: %d parameter dimension(s) stay replicated because the mesh does "
                      "not divide them, e.g. %s: %s=%d over %s", len(bad), path, axis, size,
                      ways)
    return bad

  def init_model(self, cfg, seed=0):
    """A freshly initialised model of shape `cfg`, created shard by shard on the mesh."""
    self.warn_undivided(cfg)
    return mesh_lib.create_sharded_model(self.model_config(cfg), self.mesh, self.rules, seed)

  def place(self, model):
    """`model` with this runtime's numerics and its parameters placed on the mesh by the rules
    (for models a loader or a transformation built elsewhere)."""
    cfg = self.model_config(model.cfg)
    if cfg.param_dtype != model.cfg.param_dtype or cfg.dtype != model.cfg.dtype:
      graphdef, abstract = self._abstract(cfg)
      params = nnx.to_pure_dict(nnx.state(model))
      params = jax.tree.map(lambda x: x.astype(cfg.weight_dtype), params)
      nnx.replace_by_pure_dict(abstract, params)
      model = nnx.merge(graphdef, abstract)
    else:
      model.cfg = cfg  # remat only: read at call time
    return mesh_lib.reshard_model(model, self.mesh, self.rules)

  def load_pretrained(self, gguf="", hf_checkpoint=""):
    """(model, ModelConfig, tokenizer) of a GGUF file (or a PRETRAINED name) or a Hugging Face
    folder, loaded straight onto the mesh in this runtime's numerics."""
    from gr2_jax.models import gguf_io, hf_io  # pylint: disable=g-import-not-at-top
    from gr2_jax.text import tokenizers  # pylint: disable=g-import-not-at-top
    kw = dict(mesh=self.mesh, rules=self.rules, dtype=self.param_dtype, compute_dtype=self.dtype)
    if gguf and hf_checkpoint:
      raise UserError("name a GGUF file or a Hugging Face checkpoint, not both")
    if gguf:
      model, cfg, tok = gguf_io.load_gguf(gguf, **kw)
    else:
      tok = tokenizers.load_tokenizer(hf_checkpoint)
      model, cfg = hf_io.load_hf_checkpoint(hf_checkpoint, **kw)
    if self.remat:
      cfg = self.model_config(cfg)
      model.cfg = cfg
    self.warn_undivided(cfg)
    return model, cfg, tok

  def load(self, artifact_dir):
    """(model, tokenizer) of a finished stage artifact (midtrain, sft, rl, opd, internalize):
    the parameters restored straight onto their shards, in this runtime's numerics."""
    from gr2_jax.models import artifact  # pylint: disable=g-import-not-at-top
    self.warn_undivided(artifact.read_model_config(artifact_dir))
    return artifact.load_model_and_tokenizer(artifact_dir, self.mesh, self.rules, self.numerics)

  def save(self, out_dir, model, tok):
    """Writes `model/` (orbax; every process takes part) and, from process 0, the model config
    and the tokenizer."""
    from gr2_jax.models import artifact  # pylint: disable=g-import-not-at-top
    artifact.save_model(out_dir, model, tok)


def for_devices(section_, devices=None, num_devices=0):
  """The runtime a `runtime` config section describes, over `devices` (default: all of every
  process), the first `num_devices` of them when that is > 0."""
  section_ = section_ if section_ is not None else section()
  devices = list(jax.devices() if devices is None else devices)
  if num_devices:
    if num_devices > len(devices):
      raise UserError(f"num_devices={num_devices} but only {len(devices)} devices are present")
    devices = devices[:num_devices]
  shape = tuple(int(s) for s in section_.mesh)
  mesh = mesh_lib.make_mesh(shape, devices=devices)
  return Runtime(mesh=mesh, rules=parse_rules(tuple(section_.rules)), dtype=section_.dtype,
                 param_dtype=section_.param_dtype, remat=bool(section_.remat))


def _stage_setup(ctx):
  """(the composed config's `runtime` section, the stage section's num_devices (0 = all))."""
  runtime_section = ctx.config.get("runtime") if hasattr(ctx.config, "get") else None
  return runtime_section, int(ctx.section.get("num_devices", 0) or 0)


def for_stage(ctx, num_devices=None):
  """The runtime of a stage: the composed config's `runtime` section over the stage's
  `num_devices` (its section's field, 0 = all)."""
  runtime_section, stage_devices = _stage_setup(ctx)
  return for_devices(runtime_section,
                     num_devices=stage_devices if num_devices is None else num_devices)


def run_stage(ctx, fn):
  """`fn(ctx, rt)` inside the stage's runtime (`for_stage`), with the mesh and numerics logged:
  the body of a model stage's `run`."""
  rt = for_stage(ctx)
  logging.info("[%s] %s", ctx.name, describe(rt))
  with rt.activate():
    return fn(ctx, rt)


def split_for_stage(ctx, num_second):
  """Two runtimes of a stage over disjoint devices, (first, second), the second on the last
  `num_second` of the stage's devices (e.g. a student and a teacher on their own devices)."""
  runtime_section, num_devices = _stage_setup(ctx)
  devices = list(jax.devices())[:num_devices or None]
  if not 0 < num_second < len(devices):
    raise UserError(f"cannot give {num_second} of {len(devices)} devices to a second mesh: "
                    "both parts need at least one")
  return (for_devices(runtime_section, devices[:-num_second]),
          for_devices(runtime_section, devices[-num_second:]))


def describe(rt):
  """One log line: the mesh and numerics."""
  return (f"mesh {json.dumps(dict(rt.mesh.shape))} over {rt.mesh.size} device(s) "
          f"({rt.mesh.devices.flat[0].platform}), compute {rt.dtype}, params {rt.param_dtype}"
          + (", remat" if rt.remat else "") + (f", {jax.process_count()} processes"
                                                if jax.process_count() > 1 else ""))


def process_zero():
  """True on the process that writes logs, tables and non-checkpoint artifacts."""
  return jax.process_index() == 0
