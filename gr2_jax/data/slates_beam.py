"""The slates builder as an Apache Beam pipeline (`--config.data.beam_runner=...`).

The same tfds builder as the in-memory path (`slates.Gr2Slates`), whose splits come from a
Beam pipeline instead of arrays: read the impression log (Parquet, CSV or TSV), map each row's
user and item to their ids, group by user, and run `impressions.build_slates` on each user's
rows. tfds's Beam writer then shuffles by key and writes the ArrayRecord shards, so both paths
write the same records. Drop counts come back as Beam counters.

The id tables (users kept, items of the item file) and the period cuts are computed by the data
stage before the pipeline starts and travel with the pipeline's functions. The data stage runs
this module as its own process (`build_in_child`), so neither Beam nor gRPC is ever loaded into
a process that runs JAX:

  python -m gr2_jax.data.slates_beam PLAN.pkl OUT_DIR RUNNER OPTIONS COUNTS.json

  --config.data.beam_runner=DirectRunner \
  --config.data.beam_options="--direct_num_workers=2 --direct_running_mode=multi_processing"
  --config.data.beam_runner=DataflowRunner --config.data.beam_options="--project=P \
      --region=us-central1 --temp_location=gs://B/tmp --requirements_file=requirements.txt"
  --config.data.beam_runner=SparkRunner --config.data.beam_options="--spark_master_url=..."
"""

import csv
import json
import math
import pickle
import shlex
import sys

import apache_beam as beam
import numpy as np
import tensorflow_datasets as tfds
from apache_beam.metrics.metric import MetricsFilter

from gr2_jax.data import impressions
from gr2_jax.data import slates as slates_lib

NAMESPACE = "gr2_slates"
_FIELDS = ("request", "user", "item", "timestamp", "position", "label", "grade")
_DTYPES = (np.int64, np.int64, np.int64, np.int64, np.int64, np.float32, np.int8)


def _number(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def _int_or_bad(value, lo, hi):
  x = _number(value)
  return int(x) if lo <= x < hi else -1  # NaN compares False


def map_row(rec, plan):
  """A log row (dict) -> (user id, row tuple), or nothing for users left out (counted).
  Conversions match `impressions.read_log`'s."""
  user = str(rec["user"])
  uid = plan.user_index.get(user)
  if uid is None:
    beam.metrics.Metrics.counter(NAMESPACE, "user_left_out_rows").inc()
    return
  grade = _number(rec.get("grade"))
  grade = -1 if math.isnan(grade) else int(min(max(grade, -1), 127))
  yield uid, (impressions.request_hash(str(rec["request_id"]), user), uid,
              plan.item_index.get(str(rec["item"]), -1),
              _int_or_bad(rec["timestamp"], 0, impressions.MAX_TIMESTAMP),
              _int_or_bad(rec["position"], 0, math.inf), _number(rec["label"]), grade)


def user_examples(user_rows, plan):
  """One user's rows -> (split, (key, example)) for each slate; drop counts as counters."""
  _, tuples = user_rows
  cols = list(zip(*tuples))
  rows = {f: np.asarray(c, dtype=t) for f, c, t in zip(_FIELDS, cols, _DTYPES)}
  records, counts = impressions.build_slates(
      rows, slate_size=plan.slate_size, cuts=plan.cuts, max_history=plan.max_history,
      min_history=plan.min_history)
  for name, n in counts.items():
    if n:
      beam.metrics.Metrics.counter(NAMESPACE, name).inc(n)
  for split, r in records.items():
    for i in range(len(r["example_id"])):
      yield split, (int(r["example_id"][i]), slates_lib.example_of(r, i))


def _read(pipeline, plan):
  if plan.path.endswith(".parquet"):
    cols = [c for c in impressions.LOG_COLUMNS + impressions.OPTIONAL_COLUMNS
            if c in plan.columns]
    return pipeline | "ReadParquet" >> beam.io.ReadFromParquet(plan.path, columns=cols)
  sep = "\t" if plan.path.endswith(".tsv") else ","
  header = list(plan.columns)

  def parse(line):
    values = next(csv.reader([line], delimiter=sep))
    return dict(zip(header, values))

  return (pipeline | "ReadText" >> beam.io.ReadFromText(plan.path, skip_header_lines=1)
          | "ParseLine" >> beam.Map(parse))


def split_collections(pipeline, plan):
  """{split: PCollection of (key, example)} for the tfds builder."""
  splits = list(slates_lib.SPLITS.values())
  examples = (_read(pipeline, plan)
              | "MapIds" >> beam.FlatMap(map_row, plan)
              | "ByUser" >> beam.GroupByKey()
              | "Slates" >> beam.FlatMap(user_examples, plan))
  parts = examples | "BySplit" >> beam.Partition(lambda e, n: splits.index(e[0]), len(splits))
  return {s: parts[i] | f"Drop{s}" >> beam.Map(lambda e: e[1]) for i, s in enumerate(splits)}


class Gr2SlatesBeam(slates_lib.Gr2Slates, skip_registration=True):
  """`Gr2Slates` whose splits come from the Beam pipeline above."""

  name = slates_lib.BUILDER_NAME  # same folder and shard names as the in-memory path

  def __init__(self, *, plan, **kwargs):
    self._plan = plan
    self.counts = {}
    super().__init__(records=None, slate_size=plan.slate_size, **kwargs)

  def _split_generators(self, dl_manager, pipeline):  # pylint: disable=arguments-differ
    del dl_manager
    return split_collections(pipeline, self._plan)

  def _process_pipeline_result(self, pipeline_result):
    result = pipeline_result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for c in result["counters"]:
      value = c.committed if c.committed is not None else c.attempted
      self.counts[c.key.metric.name] = self.counts.get(c.key.metric.name, 0) + int(value)


def write(out_dir, plan, runner, options=""):
  """Builds the slates with Beam under out_dir; returns (data path, counts)."""
  builder = Gr2SlatesBeam(plan=plan, data_dir=out_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      beam_runner=runner, verify_ssl=False,
      beam_options=beam.options.pipeline_options.PipelineOptions(shlex.split(options))))
  return builder.data_path, builder.counts


def main(argv):
  plan_path, out_dir, runner, options, counts_path = argv[1:6]
  with open(plan_path, "rb") as f:
    plan = pickle.load(f)
  _, counts = write(out_dir, plan, runner, options)
  with open(counts_path, "w") as f:
    json.dump(counts, f)


if __name__ == "__main__":
  main(sys.argv)
