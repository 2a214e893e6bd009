"""What every benchmark script shares: the machine's description, appending to BENCHMARKS.md,
timing, and the machine's measured matmul peak and memory-copy bandwidth."""

import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "BENCHMARKS.md")


def machine_description():
  """CPU model and cores (with the load at start) or the accelerators; jax version; date."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    model = platform.processor() or platform.machine() or "unknown CPU"
    try:
      with open("/proc/cpuinfo") as f:
        for line in f:
          if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    except OSError:
      pass
    desc = f"CPU: {model}, {os.cpu_count()} cores"
    if hasattr(os, "getloadavg"):
      # Other processes on the same cores slow every number here; say how busy they were.
      desc += f", load average {os.getloadavg()[0]:.1f} at start"
  else:
    desc = f"{len(jax.devices())} x {dev.device_kind}"
  return f"{desc}; jax {jax.__version__}; {datetime.date.today().isoformat()}"


def append_section(text, path=BENCHMARKS_MD):
  """Appends a markdown section to `path`, writing the file's preamble if it is new."""
  new = not os.path.exists(path)
  with open(path, "a") as f:
    if new:
      f.write("# Benchmarks\n\nMeasured by the scripts under `benchmarks/`; each run appends "
              "a section with the machine it ran on. Compare numbers only within one "
              "section (same machine, same run).\n\n")
    f.write(text.rstrip("\n") + "\n")


def timed(fn, reps, setup=None):
  """Median seconds of `fn(*setup())` over `reps` runs (setup untimed); the result of the last."""
  times, out = [], None
  for _ in range(reps):
    args = setup() if setup else ()
    jax.block_until_ready(args)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def matmul_peak(n, dtype):
  """FLOP/s of an n x n x n matmul (jnp.dot) in `dtype` (best of 5)."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype)).lower(a, b).compile()
  jax.block_until_ready(f(a, b))
  best = min(timed(f, 1, lambda: (a, b))[0] for _ in range(5))
  return 2 * n ** 3 / best


def copy_bandwidth(num_bytes):
  """Bytes/s (read + written) of a jitted `a + 1` on a large float32 array, in place (best of 5).

  The array is donated, so each result reuses its buffer: a fresh output buffer would add the
  cost of faulting in new pages (several times slower on Linux), which a jitted loop over
  reused buffers (the decode loop) does not pay.
  """
  f = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  x = jax.block_until_ready(f(jnp.ones((num_bytes // 4,), jnp.float32)))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    x = jax.block_until_ready(f(x))
    times.append(time.perf_counter() - start)
  return 2 * x.nbytes / min(times)
