"""SID token strings, the unified item format of prompts, and the SID table artifact.

An item's SID is written `<|sid_begin|><s_a_57><s_b_7><s_c_23><s_d_4><|sid_end|>`: one token
per (level, code), levels lettered a, b, c, ...

`sid_table.json`: {"num_levels": L (all levels, disambiguation included), "num_learned": ...,
"codebook_size": C, "items": [{"id", "key", "codes": [...], "sid": "<|sid_begin|>..."}, ...]}
in item-id order.
"""

import json
import os
import re
import string

from gr2_jax.errors import UserError

SID_BEGIN = "<|sid_begin|>"
SID_END = "<|sid_end|>"
_LETTERS = string.ascii_lowercase
_SID_RE = re.compile(re.escape(SID_BEGIN) + r"((?:<s_[a-z]_\d+>)+)" + re.escape(SID_END))
_CODE_RE = re.compile(r"<s_([a-z])_(\d+)>")


def level_letter(level):
  if not 0 <= level < len(_LETTERS):
    raise ValueError(f"SID level {level} out of range 0..{len(_LETTERS) - 1}")
  return _LETTERS[level]


def code_token(level, code):
  return f"<s_{level_letter(level)}_{int(code)}>"


def sid_tokens(codes_row):
  """(57, 7, 23, 4) -> "<|sid_begin|><s_a_57><s_b_7><s_c_23><s_d_4><|sid_end|>"."""
  return SID_BEGIN + "".join(code_token(l, c) for l, c in enumerate(codes_row)) + SID_END


def all_sid_tokens(num_levels, codebook_size):
  """The vocabulary extension: begin, end, then one token per (level, code) in order."""
  return [SID_BEGIN, SID_END] + [code_token(l, c) for l in range(num_levels)
                                 for c in range(codebook_size)]


def parse_sid(text):
  """First SID in `text` -> its codes, or None if there is none or its levels are out of order."""
  m = _SID_RE.search(text)
  if not m:
    return None
  out = []
  for level, (letter, code) in enumerate(_CODE_RE.findall(m.group(1))):
    if letter != level_letter(level):
      return None
    out.append(int(code))
  return tuple(out)


def format_item(item, sid_str, fields=("title", "year", "genres")):
  """Unified item format: `<SID> Toy Story (1995) | Animation, Children's, Comedy`."""
  head = item.get("title", "") if "title" in fields else ""
  if "year" in fields and item.get("year") not in (None, ""):
    head = f"{head} ({item['year']})"
  parts = [f"{sid_str} {head}".strip()]
  for f in fields:
    if f in ("title", "year"):
      continue
    v = item.get(f)
    v = ", ".join(v) if isinstance(v, (list, tuple)) else ("" if v is None else str(v))
    if v:
      parts.append(v)
  return " | ".join(parts)


def save_sid_table(path, items, codes, num_learned, codebook_size):
  rows = [{"id": it["id"], "key": it["key"], "codes": [int(c) for c in row],
           "sid": sid_tokens(row)} for it, row in zip(items, codes)]
  table = {"num_levels": int(len(codes[0])) if len(codes) else 0,
           "num_learned": int(num_learned), "codebook_size": int(codebook_size),
           "items": rows}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(table, f)
  os.replace(tmp, path)


def load_sid_table(path):
  """Reads sid_table.json (a file or the sids artifact folder holding it)."""
  if os.path.isdir(path):
    path = os.path.join(path, "sid_table.json")
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist; run the sids stage "
                    "(python -m gr2_jax.main --config=configs/sids.py ...)")
  with open(path) as f:
    try:
      table = json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"{path} is not valid JSON ({e}); rerun the sids stage") from e
  for k in ("num_levels", "codebook_size", "items"):
    if k not in table:
      raise UserError(f"{path} lacks field {k!r}; rerun the sids stage")
  return table
