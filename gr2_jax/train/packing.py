"""Sequence packing: many short examples per row, kept apart by segment ids.

An example is (ids [L], weights [L]) where weights[i] is the loss weight of predicting ids[i]
from the tokens before it (0 on prompts, 1 on targets, any value for weighted SFT). Examples are
laid into rows of `seq_len` tokens in order (a new row starts when the next example does not
fit). In a row, position t predicts token t+1 of the same segment with that token's weight; the
last token of each segment and padding predict nothing. Segment ids (1, 2, ... per row, 0 =
padding) stop the model's attention at example boundaries and positions restart at 0 in each
example, so a packed example sees exactly what it would see alone.
"""

import numpy as np

from gr2_jax.errors import UserError

FIELDS = ("tokens", "positions", "segment_ids", "targets", "weights", "task")


def pack(examples, seq_len, pad_id=0, tasks=None, pointers=None):
  """Packs `examples` into rows; returns dict of arrays [N, seq_len] (see FIELDS).

  Args:
    examples: sequence of (ids, weights) pairs.
    seq_len: row length.
    pad_id: token id of padding.
    tasks: optional int per example, copied to `task` on each of its predicted tokens (-1
      elsewhere), so that trained tokens can be counted per task.
    pointers: optional {field: one int array [L] per example}: at position i of an example, a
      position of the same example (-1 = none). Each becomes an int32 field of the rows, at the
      example's positions, pointing at row positions (the example's offset added; -1 kept).
  """
  if seq_len < 2:
    raise UserError(f"seq_len={seq_len} must be at least 2")
  if tasks is None:
    tasks = [0] * len(examples)
  rows, row, used = [], [], 0
  for i, (ids, _) in enumerate(examples):
    n = len(ids)
    if n > seq_len:
      raise UserError(f"example {i} has {n} tokens but the sequence length is {seq_len}; raise "
                      "the sequence length or shorten the examples")
    if n < 2:
      continue  # nothing to predict
    if used + n > seq_len:
      rows.append(row)
      row, used = [], 0
    row.append(i)
    used += n
  if row:
    rows.append(row)
  out = {
      "tokens": np.full((len(rows), seq_len), pad_id, np.int32),
      "positions": np.zeros((len(rows), seq_len), np.int32),
      "segment_ids": np.zeros((len(rows), seq_len), np.int32),
      "targets": np.full((len(rows), seq_len), pad_id, np.int32),
      "weights": np.zeros((len(rows), seq_len), np.float32),
      "task": np.full((len(rows), seq_len), -1, np.int32),
  }
  pointers = dict(pointers or {})
  for name, values in pointers.items():
    if name in out or len(values) != len(examples):
      raise UserError(f"pointer field {name!r} must be new and hold one array per example "
                      f"({len(examples)}), got {len(values)}")
    out[name] = np.full((len(rows), seq_len), -1, np.int32)
  for r, members in enumerate(rows):
    start = 0
    for seg, i in enumerate(members, start=1):
      ids = np.asarray(examples[i][0], np.int32)
      w = np.asarray(examples[i][1], np.float32)
      n = len(ids)
      sl = slice(start, start + n)
      out["tokens"][r, sl] = ids
      out["positions"][r, sl] = np.arange(n)
      out["segment_ids"][r, sl] = seg
      out["targets"][r, start:start + n - 1] = ids[1:]
      out["weights"][r, start:start + n - 1] = w[1:]
      out["task"][r, start:start + n - 1] = tasks[i]
      for name, values in pointers.items():
        p = np.asarray(values[i], np.int64)
        if p.shape != (n,) or p.max(initial=-1) >= n:
          raise UserError(f"pointer field {name!r} of example {i} must be [{n}] positions of "
                          f"the example or -1")
        out[name][r, sl] = np.where(p >= 0, p + start, -1)
      start += n
  return out
