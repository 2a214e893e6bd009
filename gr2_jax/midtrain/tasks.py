"""The four mid-training tasks as text documents, and their token mix.

Every document is plain text with SIDs written inline; training is next-token prediction on
all of it. The evaluation prompts are prefixes of these layouts:
  (a) sequential preference: `History: <sid><sid>...\\nNext: <sid>`
  (b) item captioning: `<sid> title: Toy Story\\nyear: 1995\\ngenres: Animation, Comedy` and the
      reverse `title: Toy Story (1995)\\nsid: <sid>`
  (c) user persona grounding: `User: 25-34, male, programmer. Likes Comedy, Drama.\\n
      Watched: <sid><sid>...`
  (d) plain item text: `Toy Story (1995) is an Animation, Children's, Comedy movie. ...`
  (e) slate ranking: `History: <sid>...\\nCandidates: <sid>...\\n{"recommendations": [...]}`,
      a training-period slate shown in a seeded shuffle and answered in the re-ranking JSON
      with the true next item first and the other candidates in the legacy order. It drills
      the skill every later stage needs and a model trained from scratch lacks: copying a
      candidate's SID, token by token, from wherever it stands in the prompt.
Only interactions of the training periods (0-1) are used.
"""

import collections

import numpy as np

from gr2_jax.errors import UserError
from gr2_jax.text import prompts

TASKS = ("sequential", "caption", "persona", "text", "slates")

# MovieLens-1M user codes; other data sets give free text or nothing.
_AGES = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55",
         56: "56+"}
_OCCUPATIONS = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                "customer service", "doctor/health care", "executive/managerial", "farmer",
                "homemaker", "K-12 student", "lawyer", "programmer", "retired",
                "sales/marketing", "scientist", "self-employed", "technician/engineer",
                "tradesman/craftsman", "unemployed", "writer")
_GENDERS = {"M": "male", "F": "female"}


def title_with_year(item):
  return f"{item['title']} ({item['year']})" if item.get("year") not in (None, "") else (
      item["title"])


def sequential_prompt(history_sids):
  return "History: " + "".join(history_sids) + "\nNext: "


def caption_prompt(sid):
  return f"{sid} title:"  # the title's leading space is part of its first token


def sequential_docs(examples, sids, max_items):
  """(a) One document per training-period example: its last `max_items` history items."""
  docs = []
  for row in np.flatnonzero(examples["period"] == 1):
    hist = examples["history"][row]
    hist = hist[hist >= 0][-max_items:]
    docs.append(sequential_prompt([sids[i] for i in hist]) + sids[examples["target"][row]])
  return docs


def caption_docs(items, sids, item_ids):
  """(b) SID -> title, year, genres; and title -> SID, for each item in `item_ids`."""
  docs = []
  for i in item_ids:
    it = items[i]
    genres = ", ".join(it.get("genres") or [])
    docs.append(f"{sids[i]} title: {it['title']}\nyear: {it.get('year')}\ngenres: {genres}")
    docs.append(f"title: {title_with_year(it)}\nsid: {sids[i]}")
  return docs


def title_docs(items, sids, item_ids):
  """SID -> title only, for each item in `item_ids`: the documents of the caption phase, which
  drills the mapping the captioning evaluation asks for."""
  return [f"{caption_prompt(sids[i])} {items[i]['title']}" for i in item_ids]


def _describe_user(user):
  parts = []
  age = user.get("age")
  if isinstance(age, int) and age in _AGES:
    parts.append(_AGES[age])
  if user.get("gender") in _GENDERS:
    parts.append(_GENDERS[user["gender"]])
  occ = user.get("occupation")
  if isinstance(occ, int) and 0 <= occ < len(_OCCUPATIONS):
    parts.append(_OCCUPATIONS[occ])
  elif isinstance(occ, str) and occ:
    parts.append(occ)
  return ", ".join(parts) or "unknown"


def persona_docs(users, items, interactions, train_mask, sids, max_items, top_genres=3):
  """(c) Per user, windows of `max_items` training-period items with the user's profile."""
  by_user = collections.defaultdict(list)
  for u, i in zip(interactions["user"][train_mask], interactions["item"][train_mask]):
    by_user[int(u)].append(int(i))
  docs = []
  for u in sorted(by_user):
    seq = by_user[u]
    genres = collections.Counter(g for i in seq for g in (items[i].get("genres") or []))
    fav = ", ".join(g for g, _ in genres.most_common(top_genres)) or "nothing yet"
    head = f"User: {_describe_user(users[u]) if u < len(users) else 'unknown'}. Likes {fav}."
    # The most recent windows first: they carry the freshest taste.
    for end in range(len(seq), 0, -max_items)[:3]:
      window = seq[max(0, end - max_items):end]
      docs.append(head + "\nWatched: " + "".join(sids[i] for i in window))
  return docs


def text_docs(items):
  """(d) Plain text about each item (no SIDs)."""
  docs = []
  for it in items:
    genres = ", ".join(it.get("genres") or []) or "unclassified"
    doc = f"{title_with_year(it)} is a {genres} movie."
    if it.get("description"):
      doc += " " + it["description"]
    docs.append(doc)
  return docs


def slate_prompt(history_sids, shown_sids):
  return "History: " + "".join(history_sids) + "\nCandidates: " + "".join(shown_sids) + "\n"


def slate_docs(slates, sids, max_items, seed):
  """(e) One document per slate (`slates_lib.load_split` arrays of a training-period split)."""
  rng = np.random.default_rng(seed)
  docs = []
  for hist, slate, target in zip(slates["history"], slates["slate"], slates["target_index"]):
    hist = hist[hist >= 0][-max_items:]
    shown = rng.permutation(len(slate))
    ranked = [int(target)] + [j for j in range(len(slate)) if j != int(target)]
    docs.append(slate_prompt([sids[i] for i in hist], [sids[slate[j]] for j in shown])
                + prompts.render_answer([sids[slate[j]] for j in ranked]))
  return docs


def parse_mix(mix):
  """{task: share} (any mapping) -> shares summing to 1, in TASKS order."""
  unknown = sorted(set(mix) - set(TASKS))
  if unknown:
    raise UserError(f"unknown mid-training task(s) {', '.join(unknown)}; valid: "
                    f"{', '.join(TASKS)}")
  shares = np.array([float(mix.get(t, 0.0)) for t in TASKS])
  if (shares < 0).any():
    raise UserError(f"task mix {dict(mix)} has a negative share")
  if shares.sum() <= 0:
    raise UserError(f"task mix {dict(mix)} sums to zero; give at least one task a positive share")
  return shares / shares.sum()


def mix_examples(pools, shares, total_tokens, seed):
  """Draws tokenised documents per task until each has its share of `total_tokens`.

  Args:
    pools: per task (TASKS order), a list of id arrays.
    shares: per task, from `parse_mix`.
  Returns:
    (examples, task ids), shuffled together. A pool smaller than its share is repeated.
  """
  rng = np.random.default_rng(seed)
  chosen, tasks = [], []
  for k, (pool, share) in enumerate(zip(pools, shares)):
    want = share * total_tokens
    if want <= 0:
      continue
    if not pool:
      raise UserError(f"task {TASKS[k]} has a positive share but no documents; set its share "
                      "to 0 or check the data")
    got = 0
    while got < want:
      for j in rng.permutation(len(pool)):
        chosen.append(pool[j])
        tasks.append(k)
        got += len(pool[j])
        if got >= want:
          break
  order = rng.permutation(len(chosen))
  return [chosen[i] for i in order], [tasks[i] for i in order]
