"""Sharding goldens: the PartitionSpec of every parameter of the qwen3-0.6b and qwen3-8b presets
under the default rules on (2, 2, 2) and (1, 1, 8) meshes of the 8 fake CPU devices, compared
with the committed plan in goldens/sharding_specs.json. A change of the rules table or of the
model's logical axes shows up here as a diff to review.

Regenerate after an intended change (and review the diff):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m tests.parallel.test_sharding_goldens
"""

import json
import os
import sys

import jax

from gr2_jax.models import qwen3
from gr2_jax.parallel import runtime

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens",
                      "sharding_specs.json")
PRESETS = ("qwen3-0.6b", "qwen3-8b")
MESHES = ((2, 2, 2), (1, 1, 8))


def _entry(axis):
  return list(axis) if isinstance(axis, tuple) else axis


def plan():
  """{preset: {"2x2x2": {param path: [mesh axis or null or [axes], ...]}}}."""
  out = {}
  for preset in PRESETS:
    cfg = qwen3.get_model_config(preset)
    out[preset] = {}
    for shape in MESHES:
      section = runtime.section()
      section.mesh = shape
      rt = runtime.for_devices(section, devices=jax.devices()[:8])
      specs = rt.param_specs(cfg)
      out[preset]["x".join(map(str, shape))] = {
          path: [_entry(a) for a in spec] for path, spec in sorted(specs.items())}
  return out


def test_param_specs_match_the_committed_goldens():
  with open(GOLDEN) as f:
    golden = json.load(f)
  got = json.loads(json.dumps(plan()))
  assert set(got) == set(golden)
  for preset in golden:
    assert set(got[preset]) == set(golden[preset]), preset
    for mesh, specs in golden[preset].items():
      assert set(got[preset][mesh]) == set(specs), (preset, mesh)
      diff = {p: (got[preset][mesh][p], s) for p, s in specs.items()
              if got[preset][mesh][p] != s}
      assert not diff, (preset, mesh, dict(list(diff.items())[:5]))


def test_goldens_shard_what_they_should():
  """The plan read by hand: on (1, 1, 8) every big matrix of qwen3-8b is split 8 ways over
  "tensor" (the 8 KV heads too; "embed" maps to fsdp, of size 1 there); on (2, 2, 2) the
  projections are split over fsdp x tensor and the untied LM head [E, V] too; norms are
  replicated everywhere."""
  with open(GOLDEN) as f:
    golden = json.load(f)
  tp8 = golden["qwen3-8b"]["1x1x8"]
  assert tp8["layers/0/self_attn/q_proj/kernel"] == ["fsdp", "tensor", None]
  assert tp8["layers/0/self_attn/k_proj/kernel"] == ["fsdp", "tensor", None]
  assert tp8["layers/0/mlp/down_proj/kernel"] == ["tensor", "fsdp"]
  assert tp8["lm_head/kernel"] == ["fsdp", "tensor"]
  g222 = golden["qwen3-8b"]["2x2x2"]
  assert g222["layers/35/mlp/gate_proj/kernel"] == ["fsdp", "tensor"]
  assert g222["lm_head/kernel"] == ["fsdp", "tensor"]
  assert g222["embed_tokens/embedding"] == ["tensor", "fsdp"]
  assert "lm_head/kernel" not in golden["qwen3-0.6b"]["2x2x2"]  # tied to the embedding
  for specs in (tp8, g222):
    assert all(v == [None] for k, v in specs.items() if k.endswith("norm/weight"))


if __name__ == "__main__":
  if len(jax.devices()) < 8:
    sys.exit("set XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu")
  with open(GOLDEN, "w") as f:
    json.dump(plan(), f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"wrote {GOLDEN}")
