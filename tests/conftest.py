"""Test setup: 8 fake CPU devices for the multi-device tests, set before JAX is imported."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402  (after the XLA flags above)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A workdir holding the tiny data + legacy artifacts on the real MovieLens-1M download."""
  from gr2_jax import config_lib
  from gr2_jax import runner
  configs = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
  workdir = str(tmp_path_factory.mktemp("tiny_workdir"))
  config = config_lib.load_config_module(os.path.join(configs, "legacy.py")).get_config("tiny")
  runner.run_stage(config, workdir, "legacy")
  return workdir


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops JAX's compiled executables after each test module. Every XLA:CPU executable keeps
  memory mappings for its code; one process running the whole suite otherwise approaches the
  kernel's limit of 65,530 mappings (vm.max_map_count) and XLA's compiler then crashes."""
  yield
  import gc  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  jax.clear_caches()
  gc.collect()
