"""Process start-up of multi-host runs: one process per host (a TPU VM worker, a GKE pod),
joined into one JAX runtime by `jax.distributed.initialize` before any device is touched.

Where the processes learn of each other, first match wins:
  1. explicit flags `--coordinator_address=host:port --num_processes=N --process_id=I`
     (or the environment variables GR2_COORDINATOR_ADDRESS, GR2_NUM_PROCESSES, GR2_PROCESS_ID,
     which `launch/gke/jobset.yaml` sets);
  2. a cluster JAX detects by itself, asked for with `--distributed` (what `launch/tpu_vm.sh`
     passes: a TPU VM's workers find each other through its metadata) or seen in the
     environment (TPU_WORKER_HOSTNAMES listing more than one worker, as on GKE TPU pods; a
     SLURM job of several tasks); then `initialize()` gets no arguments;
  3. otherwise one process, and nothing is initialised.

On CPU the collectives between processes go through gloo. A process that cannot reach the
coordinator within `timeout_s` ends with one line. Once joined, a watchdog thread in every
process writes a heartbeat to the coordinator's key-value store each second and reads its
peers': a process that fails posts its error there and leaves at once, and the others end with
one line naming it; a process that is killed, or hangs, stops beating and the others end
`heartbeat_s` later, also with one line (blocked collectives cannot hang them).
"""

import os
import re
import socket
import sys
import threading
import time

import jax
from absl import logging

from gr2_jax.errors import UserError

ENV_ADDRESS, ENV_NUM, ENV_ID = "GR2_COORDINATOR_ADDRESS", "GR2_NUM_PROCESSES", "GR2_PROCESS_ID"
_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


def first_line(e):
  """The first line of an exception's message (its type's name when it has none)."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _int(name, value):
  try:
    return int(value)
  except (TypeError, ValueError):
    raise UserError(f"{name}={value!r} must be an integer") from None


def resolve(coordinator_address=None, num_processes=None, process_id=None, environ=None,
            cluster=False):
  """(mode, address, num_processes, process_id): mode "explicit", "cluster" or "single".

  Flags win over the GR2_* environment variables; a half-given set is an error.
  """
  env = os.environ if environ is None else environ
  address = coordinator_address or env.get(ENV_ADDRESS) or None
  num = num_processes if num_processes is not None else env.get(ENV_NUM)
  pid = process_id if process_id is not None else env.get(ENV_ID)
  given = [x is not None and x != "" for x in (address, num, pid)]
  if any(given):
    num = _int("num_processes", num) if given[1] else None
    pid = _int("process_id", pid) if given[2] else None
    if num is not None and num < 1:
      raise UserError(f"num_processes={num} must be >= 1")
    if num == 1 and pid in (None, 0):
      return "single", None, 1, 0
    if not all(given):
      missing = [n for n, g in zip(("--coordinator_address", "--num_processes", "--process_id"),
                                   given) if not g]
      raise UserError(f"a multi-process run needs {', '.join(missing)} as well (or "
                      f"{ENV_ADDRESS}, {ENV_NUM}, {ENV_ID})")
    if not _ADDRESS.match(address):
      raise UserError(f"coordinator address {address!r} must read host:port")
    if not 0 <= pid < num:
      raise UserError(f"process_id={pid} must be in [0, {num}) for num_processes={num}")
    return "explicit", address, num, pid
  workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if cluster or len(workers) > 1 or _int("SLURM_NTASKS", env.get("SLURM_NTASKS", 1)) > 1:
    return "cluster", None, None, None
  return "single", None, 1, 0


def initialize(coordinator_address=None, num_processes=None, process_id=None, *,
               cluster=False, timeout_s=300, heartbeat_s=100):
  """Joins this process to the run (see the module docstring); returns the mode."""
  mode, address, num, pid = resolve(coordinator_address, num_processes, process_id,
                                    cluster=cluster)
  if mode == "single":
    return mode
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX's own heartbeat check ends a process with a fatal log; ours (the watchdog) comes first
  # and says in one line what happened.
  kwargs = dict(initialization_timeout=int(timeout_s),
                heartbeat_timeout_seconds=2 * int(heartbeat_s) + 10)
  if mode == "explicit":
    kwargs.update(coordinator_address=address, num_processes=num, process_id=pid)
  where = f"{address} as process {pid} of {num}" if mode == "explicit" else "the cluster"
  logging.info("joining %s (timeout %ds)", where, timeout_s)
  if mode == "explicit" and pid != 0:
    # JAX's client aborts the process when it cannot register; find the coordinator first.
    _wait_for_port(address, timeout_s, where)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-exception-caught  (jaxlib raises its own)
    raise UserError(f"could not join {where} within {timeout_s}s: {first_line(e)}") from None
  if mode == "explicit" and jax.process_count() != num:
    raise UserError(f"joined a run of {jax.process_count()} processes, not {num}")
  logging.info("process %d of %d: %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  start_watchdog(heartbeat_s)
  return mode


def _wait_for_port(address, timeout_s, where):
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise UserError(f"could not join {where} within {timeout_s}s: nothing answers at "
                        f"{address} ({e.strerror or e}); is process 0 running?") from None
      time.sleep(0.5)


_FAILED = "gr2/failed"
_watchdog = {}


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  (the KV-store client)
  return distributed.global_state.client


def _end(message, code=3):
  sys.stderr.write(f"error: process {jax.process_index()}: {message}\n")
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access  (no shutdown barrier: the peers are gone)


def start_watchdog(heartbeat_s, interval_s=1.0):
  """Starts the heartbeat thread of a multi-process run (see the module docstring)."""
  if jax.process_count() == 1 or _watchdog:
    return
  client, me, n = _client(), jax.process_index(), jax.process_count()
  peers = [p for p in range(n) if p != me]
  _watchdog["stop"] = threading.Event()

  def loop():
    seen = {p: (None, time.monotonic()) for p in peers}
    last_ok, beat = time.monotonic(), 0
    while not _watchdog["stop"].wait(interval_s):
      now = time.monotonic()
      try:
        beat += 1
        client.key_value_set(f"gr2/alive/{me}", str(beat), allow_overwrite=True)
        last_ok = now
        failed = _try_get(client, _FAILED)
        if failed is not None:
          _end(f"ending because {failed}")
        for p in peers:
          if _try_get(client, f"gr2/done/{p}") is not None:
            seen[p] = (None, now)
            continue
          value = _try_get(client, f"gr2/alive/{p}")
          if value != seen[p][0]:
            seen[p] = (value, now)
          elif now - seen[p][1] > heartbeat_s:
            _end(f"process {p} sent no heartbeat for {heartbeat_s}s (it died or hangs); "
                 "ending too. The last complete checkpoint and finished artifacts are kept")
      except Exception as e:  # pylint: disable=broad-exception-caught
        if now - last_ok > heartbeat_s:
          _end(f"lost the coordinator (process 0) for {heartbeat_s}s: {first_line(e)}")

  threading.Thread(target=loop, name="gr2-watchdog", daemon=True).start()


def _try_get(client, key):
  try:
    return client.key_value_try_get(key)
  except Exception:  # pylint: disable=broad-exception-caught  (NOT_FOUND)
    return None


def report_failure(message):
  """Posts this process's error for its peers and leaves without the shutdown barrier (a
  multi-process run); returns with one process."""
  if jax.process_count() == 1:
    return
  try:
    _client().key_value_set(_FAILED, f"process {jax.process_index()} failed: {message}",
                            allow_overwrite=True)
  except Exception:  # pylint: disable=broad-exception-caught
    pass
  _end(message, code=2)


def finished():
  """Tells the peers this process ended normally (its heartbeats stop)."""
  if jax.process_count() == 1:
    return
  if _watchdog:
    _watchdog["stop"].set()
  try:
    _client().key_value_set(f"gr2/done/{jax.process_index()}", "1", allow_overwrite=True)
  except Exception:  # pylint: disable=broad-exception-caught
    pass


def barrier(name, timeout_s=6 * 3600):
  """Waits until every process reaches `name` (no-op with one process)."""
  if jax.process_count() == 1:
    return
  try:
    _client().wait_at_barrier(name, int(timeout_s * 1000))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise UserError(f"process {jax.process_index()}: the other processes did not reach "
                    f"{name!r}: {first_line(e)}") from None
