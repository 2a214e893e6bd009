"""The impressions source at scale: the data stage's slates build from a synthetic impression
log of `--rows` rows (in memory), and the Beam path on a smaller log, on this machine.

Each build runs as the real stage (`python -m gr2_jax.main --config=configs/data.py ...`) in a
child process under `/usr/bin/time`, which reports its peak resident memory. Rows per second count read + build (+ write) over every row of the log.

  python benchmarks/bench_impressions.py                  # 10M rows in memory, 200k with Beam
  python benchmarks/bench_impressions.py --rows=1000000 --beam_rows=0 --no_append
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # pylint: disable=g-import-not-at-top
from gr2_jax.data import synthetic  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 10_000_000, "Rows of the log the in-memory path builds from.")
flags.DEFINE_integer("beam_rows", 200_000, "Rows of the log the Beam path builds from (0: skip).")
flags.DEFINE_string("beam_options", "--direct_num_workers=2 --direct_running_mode=multi_processing",
                    "Beam pipeline flags of the DirectRunner run.")
flags.DEFINE_integer("slate_size", 10, "Items per served list.")
flags.DEFINE_integer("chunk_rows", 1_000_000, "data.chunk_rows.")
flags.DEFINE_bool("append", True, "Append the results to BENCHMARKS.md.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _log(folder, rows):
  users = max(rows // (FLAGS.slate_size * 50), 10)
  start = time.time()
  frame, world = synthetic.generate(num_users=users, num_items=min(5000, max(200, users // 4)),
                                    requests_per_user=50, slate_size=FLAGS.slate_size, seed=0)
  paths = synthetic.write(folder, frame, world)
  size = os.path.getsize(paths[0])
  del frame
  return paths, time.time() - start, size


def _stage(workdir, log_path, items_path, beam_runner="", beam_options=""):
  """Runs the data stage in a child; returns (wall seconds, peak RSS GiB, report)."""
  cmd = [sys.executable, "-m", "gr2_jax.main", "--config=configs/data.py", f"--workdir={workdir}",
         "--config.data.source=impressions", f"--config.data.impressions_path={log_path}",
         f"--config.data.items_path={items_path}", f"--config.data.chunk_rows={FLAGS.chunk_rows}"]
  if beam_runner:
    cmd += [f"--config.data.beam_runner={beam_runner}",
            f"--config.data.beam_options={beam_options}"]
  rss_file = os.path.join(workdir + ".rss")
  start = time.time()
  proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file] + cmd, cwd=REPO,
                        capture_output=True, text=True, check=False)
  wall = time.time() - start
  if proc.returncode:
    raise SystemExit(f"data stage failed:\n{proc.stderr[-3000:]}")
  with open(rss_file) as f:
    peak = int(f.read().split()[-1]) * 1024  # KiB
  latest = os.path.join(workdir, "data", "latest", "report.json")
  with open(latest) as f:
    report = json.load(f)
  return wall, peak / 2**30, report


def _row(name, rows, size, wall, peak, report):
  s = report["slates"]
  return (f"| {name} | {rows:,} | {size / 2**20:,.0f} | {s['read_seconds']:.1f} | "
          f"{s['build_seconds']:.1f} | {wall:.1f} | {rows / wall:,.0f} | {peak:.2f} | "
          f"{sum(s['per_split'].values()):,} |")


def main(argv):
  del argv
  lines = []
  with tempfile.TemporaryDirectory() as tmp:
    runs = [("in-memory", FLAGS.rows, "", "")]
    if FLAGS.beam_rows:
      runs += [("in-memory", FLAGS.beam_rows, "", ""),
               ("beam (DirectRunner)", FLAGS.beam_rows, "DirectRunner", FLAGS.beam_options)]
    logs = {}
    for i, (name, rows, runner, options) in enumerate(runs):
      if rows not in logs:
        folder = os.path.join(tmp, f"log{rows}")
        paths, gen_s, size = _log(folder, rows)
        logs[rows] = (paths, size)
        print(f"generated {rows:,} rows ({size / 2**20:.0f} MiB Parquet) in {gen_s:.1f}s",
              flush=True)
      (log_path, items_path), size = logs[rows]
      wall, peak, report = _stage(os.path.join(tmp, f"w{i}"), log_path, items_path, runner,
                                  options)
      line = _row(name, rows, size, wall, peak, report)
      print(line, flush=True)
      lines.append(line)
  head = ("| path | log rows | Parquet MiB | read s | build + write s | stage wall s | rows/s "
          "(wall) | peak RSS GiB | slates |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  text = (f"\n### bench_impressions: the impressions source's slates build "
          f"({common.machine_description()})\n\n"
          f"`python benchmarks/bench_impressions.py --rows={FLAGS.rows} "
          f"--beam_rows={FLAGS.beam_rows}`: synthetic logs (`gr2_jax.data.synthetic`, K="
          f"{FLAGS.slate_size}, 50 requests per user), the data stage in a child process each "
          f"(wall includes start-up, the item file, ids, the temporal split, next-item examples "
          f"and the ArrayRecord write). Beam options: `{FLAGS.beam_options}`.\n\n"
          + head + "\n" + "\n".join(lines) + "\n")
  print(text)
  if FLAGS.append:
    common.append_section(text)


if __name__ == "__main__":
  app.run(main)
