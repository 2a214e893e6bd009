"""Process start-up: which mode the flags and environment choose, and the errors of a
half-given, inconsistent or unreachable setup."""

import os
import socket
import subprocess
import sys
import time

import pytest

from gr2_jax.errors import UserError
from gr2_jax.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_flags_environment_and_cluster_detection():
  assert distributed.resolve(environ={}) == ("single", None, 1, 0)
  assert distributed.resolve("10.0.0.2:8476", 4, 3, environ={}) == ("explicit", "10.0.0.2:8476",
                                                                     4, 3)
  env = {"GR2_COORDINATOR_ADDRESS": "gr2-0.gr2:8476", "GR2_NUM_PROCESSES": "4",
         "GR2_PROCESS_ID": "2"}
  assert distributed.resolve(environ=env) == ("explicit", "gr2-0.gr2:8476", 4, 2)
  assert distributed.resolve(process_id=1, environ=env)[3] == 1  # a flag wins over the env
  assert distributed.resolve(environ={"TPU_WORKER_HOSTNAMES": "w0,w1"})[0] == "cluster"
  assert distributed.resolve(environ={"TPU_WORKER_HOSTNAMES": "w0"})[0] == "single"
  assert distributed.resolve(environ={"SLURM_NTASKS": "8"})[0] == "cluster"
  assert distributed.resolve(environ={}, cluster=True)[0] == "cluster"
  assert distributed.resolve(num_processes=1, environ={})[0] == "single"


@pytest.mark.parametrize("args, message", [
    (("127.0.0.1:1234", 2, None), "needs --process_id"),
    ((None, 2, 0), "needs --coordinator_address"),
    (("localhost", 2, 0), "must read host:port"),
    (("127.0.0.1:1234", 2, 2), r"process_id=2 must be in \[0, 2\)"),
    (("127.0.0.1:1234", 0, 0), "num_processes=0 must be >= 1"),
    (("127.0.0.1:1234", "two", 0), "num_processes='two' must be an integer"),
])
def test_bad_setups_are_one_clear_error(args, message):
  with pytest.raises(UserError, match=message):
    distributed.resolve(*args, environ={})


def test_an_unreachable_coordinator_ends_in_one_line_within_the_timeout():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # nobody listens there once the socket closes
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  t0 = time.time()
  out = subprocess.run(
      [sys.executable, "-m", "gr2_jax.main", "--config=configs/data.py:tiny",
       "--workdir=/tmp/unused", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       "--process_id=1", "--distributed_timeout_s=5"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [x for x in out.stderr.splitlines() if x.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(
      f"error: could not join 127.0.0.1:{port} as process 1 of 2 within 5s"), errors
  assert time.time() - t0 < 60
