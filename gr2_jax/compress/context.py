"""The compressor's prompt (the user context as text) and what its summary replaces.

The compressor reads the user's features and history (titles, years, genres, ratings, oldest
first) and writes a short summary of what the user likes now. The re-ranking prompt then shows
that summary in place of its history block (`gr2_jax.text.prompts.user_content`), so the
context's cost |o| is the history block's tokens in the re-ranker's prompt and the summary's
|c| the tokens of the block that replaces it.
"""

import collections

import numpy as np

from gr2_jax.text import chat
from gr2_jax.text import prompts

SYSTEM = ("You summarise a user's viewing history for a recommender. In at most {max_words} "
          "words, say what the user likes now: genres, eras, themes, and how the taste changed "
          "recently. Plain sentences, no list of titles, no '...'.")


def history_lines(history, ratings, items):
  """One line per history item (oldest first): title (year) | genres | rated r."""
  out = []
  for i, r in zip(history, ratings):
    it = items[int(i)]
    line = it["title"] + (f" ({it['year']})" if it.get("year") else "")
    if it.get("genres"):
      line += " | " + ", ".join(it["genres"])
    if r:
      line += f" | rated {float(r):g}"
    out.append(line)
  return out


def context_text(history, ratings, items, user=None, max_history=20):
  """The compressor's user turn: the user's features and the last `max_history` items."""
  lines = []
  if user:
    u = prompts.user_text(user)
    if u:
      lines.append(f"User: {u}")
  lines.append("History (oldest first):")
  lines += history_lines(history[-max_history:], ratings[-max_history:], items)
  return "\n".join(lines)


def slate_histories(slates, i):
  """(history item ids, their ratings) of stacked slate record i (left padding dropped)."""
  h = slates["history"][i]
  keep = h >= 0
  return h[keep].tolist(), slates["history_rating"][i][keep].tolist()


def compressor_prompts(slates, items, users, tok, *, max_words, max_history):
  """Chat ids (assistant turn opened) of the compressor's prompt for each slate."""
  out = []
  for i in range(len(slates["slate"])):
    hist, ratings = slate_histories(slates, i)
    user = users[int(slates["user"][i])] if users is not None else None
    msgs = [{"role": "system", "content": SYSTEM.format(max_words=max_words)},
            {"role": "user", "content": context_text(hist, ratings, items, user, max_history)}]
    out.append(chat.encode_chat(msgs, tok, add_generation_prompt=True))
  return out


def context_tokens(slates, items, sids, prompt_cfg, tok):
  """int [N]: tokens of each slate's history block in the re-ranker's prompt (|o|)."""
  out = []
  for i in range(len(slates["slate"])):
    hist, _ = slate_histories(slates, i)
    block = prompts.history_text(prompts.with_sids(hist, items, sids), prompt_cfg)
    out.append(len(tok.encode(block)))
  return np.asarray(out, np.int64)


def summary_tokens(summaries, tok):
  """int [N]: tokens of the block that shows each summary in the re-ranker's prompt (|c|)."""
  return np.asarray([len(tok.encode(prompts.SUMMARY_HEAD + "\n" + s)) for s in summaries],
                    np.int64)


def history_shares(history, items):
  """({genre: share}, {decade: share}) of the history's items: each genre's share of all the
  genre labels, each decade's ("1990s") share of the items with a year."""
  genres = collections.Counter(g for i in history for g in items[int(i)].get("genres") or ())
  years = [items[int(i)].get("year") for i in history if items[int(i)].get("year")]
  decades = collections.Counter(f"{int(y) // 10 * 10}s" for y in years)
  norm = lambda c: {k: v / sum(c.values()) for k, v in c.items()}  # noqa: E731
  return norm(genres), norm(decades)


def template_summary(history, ratings, items, recent=5):
  """A summary written from the history's statistics: the leading genres, the decade most
  watched, and the genre the last `recent` items lean to when it is new. The warm-up's target
  (`compress.warmup_steps`), a stand-in for a pretrained model's zero-shot summary."""
  genres = collections.Counter(g for i in history for g in items[int(i)].get("genres") or ())
  top = [g for g, _ in genres.most_common(3)]
  parts = []
  if top:
    parts.append("Likes " + (", ".join(top[:-1]) + " and " + top[-1] if len(top) > 1
                             else top[0]))
  years = [items[int(i)].get("year") for i in history if items[int(i)].get("year")]
  if years:
    decade = collections.Counter(int(y) // 10 * 10 for y in years).most_common(1)[0][0]
    parts.append(f"mostly {decade}s films")
  liked = [items[int(i)]["title"] for i, r in zip(history[-recent:], ratings[-recent:])
           if r and r >= max(ratings)]
  late = collections.Counter(g for i in history[-recent:] for g in items[int(i)].get("genres")
                             or ())
  shift = [g for g, _ in late.most_common(1) if g not in top]
  if shift:
    parts.append(f"lately {shift[0]}")
  if liked:
    parts.append(f"recently enjoyed {liked[-1]}")
  return ("; ".join(parts) + ".") if parts else "No clear taste yet."


def warmup_examples(slates, items, users, tok, *, max_words, max_history):
  """(ids, weights) of compressor conversations answered by `template_summary`."""
  out = []
  for i in range(len(slates["slate"])):
    hist, ratings = slate_histories(slates, i)
    user = users[int(slates["user"][i])] if users is not None else None
    msgs = [{"role": "system", "content": SYSTEM.format(max_words=max_words)},
            {"role": "user", "content": context_text(hist, ratings, items, user, max_history)},
            {"role": "assistant", "content": template_summary(hist[-max_history:],
                                                              ratings[-max_history:], items)}]
    ids, mask = chat.render_for_training(msgs, tok)
    out.append((ids, mask.astype(np.float32)))
  return out
