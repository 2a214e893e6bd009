"""What every benchmark script shares: the machine's description and appending to BENCHMARKS.md."""

import datetime
import os
import platform

import jax

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
