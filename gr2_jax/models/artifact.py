"""The model of a stage artifact (midtrain, SFT, RL, OPD, internalize): `model/` orbax
parameters beside `model_config.json` and `tokenizer/`, restored straight onto a mesh."""

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
from gr2_jax.text import tokenizers

MODEL_DIR = "model"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"


def read_model_config(artifact_dir):
  """The qwen3.ModelConfig saved in a stage artifact."""
  path = os.path.join(artifact_dir, MODEL_CONFIG_FILE)
  if not os.path.isfile(path) or not os.path.isdir(os.path.join(artifact_dir, MODEL_DIR)):
    raise UserError(f"{artifact_dir} holds no model ({MODEL_CONFIG_FILE} and {MODEL_DIR}/); "
                    "point at a finished midtrain, sft, rl, opd or internalize artifact")
  with open(path) as f:
    fields = json.load(f)
  known = {f.name for f in dataclasses.fields(qwen3.ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise UserError(f"{path} has unknown model fields {', '.join(unknown)}; it was written by "
                    "another version of gr2_jax")
  return qwen3.ModelConfig(**fields)


def load_model(artifact_dir, mesh=None, rules=None, numerics=None):
  """The model saved in a stage artifact (`model/` + `model_config.json`), on `mesh`.

  `numerics` ({"dtype", "param_dtype", "remat"}) overrides the saved ones: the parameters are
  restored in that param_dtype (orbax casts while reading).
  """
  cfg = read_model_config(artifact_dir)
  if numerics:
    cfg = dataclasses.replace(cfg, **numerics)
  mesh = mesh or mesh_lib.single_device_mesh()
  graphdef, abstract = mesh_lib.abstract_model(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
  shardings = nnx.to_pure_dict(sharding_lib.state_shardings(abstract, mesh, rules))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), shardings)
  state = ocp.StandardCheckpointer().restore(
      os.path.abspath(os.path.join(artifact_dir, MODEL_DIR)), target)
  return nnx.merge(graphdef, state)


def load_model_and_tokenizer(artifact_dir, mesh=None, rules=None, numerics=None):
  """(model, tokenizer) of a finished stage artifact, the model on `mesh` (see load_model)."""
  model = load_model(artifact_dir, mesh, rules, numerics)
  tok = tokenizers.load_tokenizer(os.path.join(artifact_dir, TOKENIZER_DIR))
  if tok.vocab_size > model.cfg.vocab_size:
    raise UserError(f"tokenizer of {artifact_dir} has {tok.vocab_size} tokens but the model "
                    f"{model.cfg.vocab_size} rows; the artifact is inconsistent, rerun its stage")
  return model, tok


def save_model(out_dir, model, tok):
  """Writes `model/` (orbax: every process writes its shards, the checkpoint is complete once
  all have), then `model_config.json` and `tokenizer/` from process 0."""
  state = nnx.to_pure_dict(nnx.state(model))
  path = os.path.abspath(os.path.join(out_dir, MODEL_DIR))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path, state, force=True)
  ckpt.wait_until_finished()
  if jax.process_index() == 0:
    tmp = os.path.join(out_dir, MODEL_CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(dataclasses.asdict(model.cfg), f, indent=2)
    os.replace(tmp, os.path.join(out_dir, MODEL_CONFIG_FILE))
    if tok is not None:
      tok.save(os.path.join(out_dir, TOKENIZER_DIR))
