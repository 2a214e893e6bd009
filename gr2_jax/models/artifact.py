"""The model of a stage artifact (midtrain, SFT, RL): `model/` orbax parameters beside
`model_config.json`, restored straight onto a mesh."""

import dataclasses
import json
import os

from flax import nnx
import jax
import orbax.checkpoint as ocp

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.parallel import sharding as sharding_lib

MODEL_DIR = "model"
MODEL_CONFIG_FILE = "model_config.json"


def load_model(artifact_dir, mesh=None):
  """The model saved in a stage artifact (`model/` + `model_config.json`), on `mesh`."""
  path = os.path.join(artifact_dir, MODEL_CONFIG_FILE)
  if not os.path.isfile(path) or not os.path.isdir(os.path.join(artifact_dir, MODEL_DIR)):
    raise UserError(f"{artifact_dir} holds no model ({MODEL_CONFIG_FILE} and {MODEL_DIR}/); "
                    "point --artifact at a finished midtrain, sft or rl artifact")
  with open(path) as f:
    fields = json.load(f)
  known = {f.name for f in dataclasses.fields(qwen3.ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise UserError(f"{path} has unknown model fields {', '.join(unknown)}; it was written by "
                    "another version of gr2_jax")
  cfg = qwen3.ModelConfig(**fields)
  mesh = mesh or mesh_lib.single_device_mesh()
  graphdef, abstract = mesh_lib.abstract_model(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
  shardings = nnx.to_pure_dict(sharding_lib.state_shardings(abstract, mesh))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), shardings)
  state = ocp.StandardCheckpointer().restore(
      os.path.abspath(os.path.join(artifact_dir, MODEL_DIR)), target)
  return nnx.merge(graphdef, state)
