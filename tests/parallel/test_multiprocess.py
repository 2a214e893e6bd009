"""Multi-host start-up proven on one machine: two processes on 127.0.0.1 with 4 fake CPU devices
each (one 8-device global mesh, gloo collectives) run the `tiny` mid-training stage through
`python -m gr2_jax.main`. Their losses equal a one-process 8-device run's, the artifact is
written once and restores in one process, and a killed process ends the other with one line.
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from gr2_jax import config_lib
from gr2_jax import runner
from gr2_jax.models import artifact
from gr2_jax.train import checkpoint
from tests.parallel import rl_worker

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = {"sids.embedding": "collaborative", "midtrain.num_devices": 0,
             "midtrain.batch_size": 8}


def _config():
  config = config_lib.load_config_module(os.path.join(REPO, "configs", "midtrain.py")).get_config(
      "tiny")
  for key, value in OVERRIDES.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


@pytest.fixture(scope="module")
def upstream(tiny_workdir):
  """The tiny workdir with the sids artifact the midtrain runs below read."""
  runner.run_stage(_config(), tiny_workdir, "sids")
  return tiny_workdir


@pytest.fixture(scope="module")
def one_process(upstream, tmp_path_factory):
  """The tiny stage run by this one process over its 8 devices (mesh (8, 1, 1))."""
  work = _workdir(upstream, tmp_path_factory.mktemp("one") / "work")
  t0 = time.time()
  runner.run_stage(_config(), work, "midtrain")
  return work, time.time() - t0


def _workdir(upstream, path):
  shutil.copytree(upstream, path, ignore=shutil.ignore_patterns("midtrain"), symlinks=True)
  return str(path)


def _port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, processes, devices, heartbeat_s=20):
  env = {k: v for k, v in os.environ.items() if not k.startswith("GR2_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  args = [sys.executable, "-m", "gr2_jax.main", "--config=configs/midtrain.py:tiny",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  port = _port()
  procs = []
  for i in range(processes):
    extra = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
              f"--process_id={i}", f"--heartbeat_timeout_s={heartbeat_s}"]
             if processes > 1 else [])
    log = open(os.path.join(workdir, f"process{i}.log"), "w")  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen(args + extra, cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT), log.name))
  return procs


def _wait(procs, timeout=300):
  for proc, log in procs:
    proc.wait(timeout=timeout)
    with open(log) as f:
      text = f.read()
    assert proc.returncode == 0, text[-3000:]


def _out(workdir):
  return runner.artifact_dir(workdir, _config(), "midtrain")


def _losses(workdir):
  with open(os.path.join(_out(workdir), "eval.json")) as f:
    training = json.load(f)["training"]
  return [h["loss"] for phase in ("warmup", "train") for h in training[phase]["loss_history"]]


def test_two_processes_train_as_one_and_write_one_artifact(upstream, one_process, tmp_path):
  two = _workdir(upstream, tmp_path / "two")
  procs = _launch(two, processes=2, devices=4)
  t0 = time.time()
  _wait(procs)
  two_seconds = time.time() - t0
  one, one_seconds = one_process
  rates = []
  for work in (two, one):
    with open(os.path.join(_out(work), "eval.json")) as f:
      rates.append(json.load(f)["training"]["train"]["tokens_per_sec"])
  print(f"two processes: {two_seconds:.1f}s (the command), {rates[0]:,.0f} train tok/s; one "
        f"process: {one_seconds:.1f}s (the stage), {rates[1]:,.0f} train tok/s")

  # The same losses, step by step, as one process over the same 8 devices.
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=0, atol=1e-5)
  with open(os.path.join(two, "process0.log")) as f:
    log = f.read()
  assert "process 0 of 2: 4 local / 8 global devices" in log
  # Each process reads only its half of every global batch of 8 rows (process 1 logs warnings
  # only; had it fed rows 0..3 too, the losses above would differ).
  assert "process 0 reads rows 0..4 of each global batch of 8" in log
  # The tokens each task contributed, counted by each process on its half and summed.
  for phase in ("warmup", "train"):
    counts = []
    for work in (two, one):
      with open(os.path.join(_out(work), "eval.json")) as f:
        counts.append(json.load(f)["training"][phase]["task_tokens"])
    assert counts[0] == pytest.approx(counts[1]) and sum(counts[0].values()) > 0

  # Written once: process 0's metrics only (not one line per process), one done.json.
  out = _out(two)
  with open(os.path.join(out, "train", "tb", "metrics.jsonl")) as f:
    train_lines = [json.loads(x) for x in f if '"train"' in x]
  assert [x["step"] for x in train_lines] == [4, 8, 12]
  assert runner.is_done(out)
  for step_dir in glob.glob(os.path.join(out, "*", "ckpt", "[0-9]*")):
    assert checkpoint._is_complete(step_dir), step_dir  # pylint: disable=protected-access

  # The two-process artifact restores in this one process and equals the one-process one.
  a, _ = artifact.load_model_and_tokenizer(out)
  b, _ = artifact.load_model_and_tokenizer(_out(one))
  for x, y in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(a))),
                  jax.tree.leaves(nnx.to_pure_dict(nnx.state(b)))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def test_a_killed_process_ends_the_other_with_one_line(upstream, tmp_path):
  work = _workdir(upstream, tmp_path / "killed")
  procs = _launch(work, processes=2, devices=4, heartbeat_s=5)
  (first, first_log), (second, _) = procs
  deadline = time.time() + 240
  while time.time() < deadline:  # kill process 1 once training is under way
    with open(first_log) as f:
      if "[midtrain/warmup] step" in f.read():
        break
    assert first.poll() is None, "process 0 ended early"
    time.sleep(0.5)
  else:
    pytest.fail("training did not start")
  second.send_signal(signal.SIGKILL)
  t_kill = time.time()
  first.wait(timeout=120)
  waited = time.time() - t_kill
  with open(first_log) as f:
    lines = [x for x in f.read().splitlines() if x.startswith("error:")]
  assert first.returncode != 0
  # One line: usually the watchdog's; a collective that notices the lost peer first ends the
  # process through the same one-line path.
  assert len(lines) == 1 and lines[0].startswith("error: process 0: "), lines
  if "heartbeat" in lines[0]:
    assert lines[0] == ("error: process 0: process 1 sent no heartbeat for 5s (it died or "
                        "hangs); ending too. The last complete checkpoint and finished "
                        "artifacts are kept")
  assert waited < 60, waited
  out = _out(work)
  assert not runner.is_done(out)  # nothing marked complete
  # A step folder is complete or absent (orbax's temporary folders are dropped on the next open).
  for step_dir in glob.glob(os.path.join(out, "*", "ckpt", "*")):
    if os.path.basename(step_dir).isdigit():
      assert checkpoint._is_complete(step_dir), step_dir  # pylint: disable=protected-access


def test_the_rl_loop_on_two_processes_matches_one(tmp_path):
  """The RL iterations (rollouts sampled over the global mesh and gathered, rewards, dynamic
  sampling, updates, checkpoints) on the toy re-ranker: the same history and parameters."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("GR2_")}
  env.update(JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "tests.parallel.rl_worker"]
  port = _port()
  procs = [subprocess.Popen(
      cmd + [str(tmp_path / "two"), f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}"], cwd=REPO,
      env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  rl_worker.run(str(tmp_path / "one"))  # this process, its 8 devices
  reports = []
  for run in ("two", "one"):
    with open(tmp_path / run / "report.json") as f:
      reports.append(json.load(f))
  assert (reports[0]["processes"], reports[0]["devices"]) == (2, 8)
  timing = ("iteration_seconds", "rollout_seconds", "rollout_tokens_per_sec")
  assert sum(h["applied_updates"] for h in reports[0]["history"]) >= 1  # it did learn
  for a, b in zip(reports[0]["history"], reports[1]["history"]):
    for k in a:
      if k not in timing:
        assert a[k] == pytest.approx(b[k], abs=1e-5, nan_ok=True), k
  two, one = (np.load(tmp_path / run / "params.npz") for run in ("two", "one"))
  for k in one.files:
    np.testing.assert_allclose(two[k], one[k], atol=1e-5, rtol=0)


def test_launch_scripts_parse():
  subprocess.run(["bash", "-n", os.path.join(REPO, "launch", "tpu_vm.sh")], check=True)
  with open(os.path.join(REPO, "launch", "gke", "jobset.yaml")) as f:
    jobset = yaml.safe_load(f)
  assert jobset["kind"] == "JobSet"
  pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  env = {e["name"] for e in pod["containers"][0]["env"]}
  assert env == {"GR2_COORDINATOR_ADDRESS", "GR2_NUM_PROCESSES", "GR2_PROCESS_ID"}
  out = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_vm.sh")], capture_output=True,
                       text=True, check=False)
  assert out.returncode == 2 and out.stderr.startswith("usage:")


def test_tensor_and_fsdp_mesh_trains_as_the_data_parallel_one(upstream, one_process, tmp_path):
  """The tiny stage on a (2, 2, 2) data x fsdp x tensor mesh and on (8, 1, 1): same losses."""
  losses = {}
  for shape in ((2, 2, 2), (8, 1, 1)):
    if shape == (8, 1, 1):
      work = one_process[0]
    else:
      work = _workdir(upstream, tmp_path / "x".join(map(str, shape)))
      config = _config()
      config.runtime.mesh = shape
      runner.run_stage(config, work, "midtrain")
    losses[shape] = _losses(work)
    params = nnx.to_pure_dict(nnx.state(artifact.load_model(_out(work))))
    losses[shape, "params"] = jax.tree.map(np.asarray, params)
  np.testing.assert_allclose(losses[2, 2, 2], losses[8, 1, 1], rtol=0, atol=1e-5)
  for x, y in zip(jax.tree.leaves(losses[(2, 2, 2), "params"]),
                  jax.tree.leaves(losses[(8, 1, 1), "params"])):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
