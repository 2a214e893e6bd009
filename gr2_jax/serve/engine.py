"""The serving engine: a trained re-ranking checkpoint answering batches of requests.

`Engine` turns requests into prompts and runs them through the on-device sampler in fixed
compile shapes (batch sizes padded to powers of two, prompt widths to a multiple); `Batcher`
gathers concurrent requests of one kind into those batches (a queue with a maximum batch size
and a maximum wait).

Re-ranking without an explanation: the no-reasoning variant of the checkpoint's prompt, the
assistant turn opened with the answer's head (`{"recommendations": [`), then the list decoded
greedily under a strict list constraint (`constraints.list_constraint` over the tokenizer's own
ways of writing each candidate, `rerank.evaluate.answer_ways`): each candidate once, then the
closing and the stop token, so every answer is a permutation of the candidates; the tokens the
constraint forces are fed in chunks, one model call per choice (`ServeConfig.jump_forward`).
An answer the parser still rejects falls back to the input order, counted and flagged. The
prompt's shared prefix (the system turn, and the candidates when the prompt shows them first:
part order "system_candidates_user") is prefilled once per distinct prefix and reused
(`sampler.PrefixCache`). With an explanation: the reasoning prompt, free greedy decoding, then
the ranking decoded again under the constraint where the free one is invalid
(`rerank.evaluate.rerank`).
"""

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import os
import threading
import time

from absl import logging
import jax
import numpy as np

from gr2_jax.data import artifacts
from gr2_jax.errors import UserError
from gr2_jax.models import artifact as model_artifact
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.sampling import sampler
from gr2_jax.teachers import base
from gr2_jax.text import chat
from gr2_jax.text import parser
from gr2_jax.text import prompts
from gr2_jax.text import tokenizers

# Artifacts the server looks for in a workdir, in this order, when no model folder is named.
MODEL_STAGES = ("internalize", "rl", "opd", "sft")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  max_batch: int = 8  # requests per sampler call (padded up to a power of two)
  max_wait_ms: float = 10.0  # the most a batch waits to fill (see `Batcher`)
  prefix_reuse: bool = True
  prefix_cache_entries: int = 256
  # Tokens the list constraint forces (the rest of a SID once its first code names a candidate,
  # separators, the closing) fed in chunks of up to this many per decode step; 0 = off.
  jump_forward: int = 8
  prompt_multiple: int = 64  # prompt (and prefix, suffix) widths are padded to this
  max_prompt_tokens: int = 4096  # longer prompts are refused
  max_candidates: int = 10  # K the model was trained for; more candidates are refused
  explain_max_new_tokens: int = 256
  chat_max_tokens: int = 512  # the largest max_tokens a chat request may ask for

  def __post_init__(self):
    if self.max_batch < 1 or self.max_wait_ms < 0 or self.prompt_multiple < 1:
      raise UserError("serve: max_batch >= 1, max_wait_ms >= 0 and prompt_multiple >= 1")
    if self.jump_forward < 0 or self.jump_forward == 1:
      raise UserError(f"serve: jump_forward={self.jump_forward} must be 0 (off) or >= 2")
    if self.max_candidates < 2 or self.max_prompt_tokens < 16 or self.chat_max_tokens < 1:
      raise UserError("serve: max_candidates >= 2, max_prompt_tokens >= 16, "
                      "chat_max_tokens >= 1")


def bucket(n, cap):
  """The smallest power of two >= n, at most cap (n <= cap)."""
  return min(1 << max(0, int(n) - 1).bit_length(), cap)


def find_model_dir(workdir):
  """The newest finished model artifact of the workdir, by `MODEL_STAGES` order."""
  for stage in MODEL_STAGES:
    path = os.path.join(workdir, stage, "latest")
    if os.path.isfile(os.path.join(path, "done.json")) and os.path.isfile(
        os.path.join(path, rerank_lib.PROMPT_FILE)):
      return os.path.realpath(path)
  raise UserError(f"{workdir} holds no finished {', '.join(MODEL_STAGES)} artifact; run "
                  "`python -m gr2_jax.main --config=configs/rl.py --workdir=...` first or pass "
                  "--model_dir")


def slate_size(workdir):
  """K of the workdir's legacy slates (None when unknown)."""
  report = os.path.join(workdir, "legacy", "latest", "report.json")
  if os.path.isfile(report):
    with open(report) as f:
      k = json.load(f).get("slate_size")
    if k:
      return k
  path = os.path.join(workdir, "legacy", "latest", "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    cfg = json.load(f)
  return (cfg.get("section") or {}).get("slate_size")


def _common_prefix(a, b):
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


class Engine:
  """A checkpoint with its tokenizer, prompt, SID table and item catalogue, answering batches."""

  def __init__(self, model, tok, prompt_cfg, sids, items, cfg=ServeConfig(), name="gr2"):
    if len(sids) != len(items):
      raise UserError(f"the SID table holds {len(sids)} items but the catalogue {len(items)}")
    self.model, self.tok, self.cfg, self.name = model, tok, cfg, name
    self.sids, self.items = list(sids), list(items)
    self.prompt = {False: dataclasses.replace(prompt_cfg, reasoning=False, answer_head=True),
                   True: dataclasses.replace(prompt_cfg, reasoning=True, answer_head=False)}
    self.stops = chat.chat_stop_ids(tok)
    self.prefix_cache = (sampler.PrefixCache(model, max_entries=cfg.prefix_cache_entries,
                                             multiple=cfg.prompt_multiple)
                         if cfg.prefix_reuse else None)
    self.counts = collections.Counter()
    self._seed = itertools.count()

  @classmethod
  def from_dirs(cls, model_dir, data_dir, cfg=ServeConfig()):
    """An engine for the model artifact `model_dir` (sft / rl / opd / internalize layout) and
    the item catalogue of the data artifact `data_dir`."""
    for need in ("model_config.json", rerank_lib.PROMPT_FILE, "tokenizer"):
      if not os.path.exists(os.path.join(model_dir, need)):
        raise UserError(f"{model_dir} holds no {need}; name a finished sft, rl, opd or "
                        "internalize artifact folder")
    if not os.path.isfile(os.path.join(data_dir, "items.json")):
      raise UserError(f"{data_dir} holds no items.json; name the workdir's data artifact")
    model = model_artifact.load_model(model_dir)
    tok = tokenizers.load_tokenizer(os.path.join(model_dir, "tokenizer"))
    prompt_cfg, sids = rerank_lib.load_rerank_info(model_dir)
    return cls(model, tok, prompt_cfg, sids, artifacts.load_items(data_dir), cfg,
               name=os.path.basename(os.path.dirname(os.path.normpath(model_dir))) + "/"
               + os.path.basename(os.path.normpath(model_dir)))

  # --- validation ------------------------------------------------------------------------

  def check_rerank(self, history, candidates):
    """Raises a one-line UserError for a request the model cannot answer."""
    n = len(self.items)
    for field, ids in (("history", history), ("candidates", candidates)):
      bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
      if bad:
        raise UserError(f"unknown item id(s) in {field}: {bad[:5]} (the catalogue holds ids "
                        f"0..{n - 1})")
    k = len(candidates)
    if k < 2:
      raise UserError(f"a slate needs at least 2 candidates, got {k}")
    if k > self.cfg.max_candidates:
      raise UserError(f"{k} candidates: the model was trained on slates of at most "
                      f"{self.cfg.max_candidates}")
    if len(set(candidates)) != k:
      dup = sorted(i for i, c in collections.Counter(candidates).items() if c > 1)
      raise UserError(f"duplicate candidate(s) {dup[:5]}")
    if not history:
      raise UserError("the history is empty; the re-ranker needs at least one watched item")

  def rerank_prompt(self, history, candidates, user, explain):
    """(prompt ids, shared-prefix length, SIDs shown) of a re-ranking request."""
    cfg = self.prompt[bool(explain)]
    ex = base.TeacherExample(history=tuple(history), slate=tuple(candidates), user=user)
    ids = rerank_lib.prompt_ids([ex], self.items, self.sids, cfg, self.tok)[0]
    if len(ids) > self.cfg.max_prompt_tokens:
      raise UserError(f"the prompt has {len(ids)} tokens; the server takes at most "
                      f"{self.cfg.max_prompt_tokens} (send a shorter history)")
    # What every user shown this slate shares: the tokens common to this prompt and the same
    # slate with another (empty) user part.
    alt = rerank_lib.prompt_ids([base.TeacherExample(history=(), slate=tuple(candidates))],
                                self.items, self.sids, cfg, self.tok)[0]
    return ids, _common_prefix(ids, alt), [self.sids[i] for i in candidates]

  def check_chat(self, messages, max_tokens):
    ids = chat.encode_chat(messages, self.tok, add_generation_prompt=True)
    if len(ids) + max_tokens > self.cfg.max_prompt_tokens:
      raise UserError(f"the conversation has {len(ids)} tokens and asks for {max_tokens} more; "
                      f"the server takes at most {self.cfg.max_prompt_tokens} in all")
    return ids

  # --- batches ---------------------------------------------------------------------------

  def rerank_batch(self, reqs):
    """Answers of re-ranking requests that share K and `explain` (dicts with history,
    candidates, user, explain)."""
    explain = bool(reqs[0]["explain"])
    built = [self.rerank_prompt(r["history"], r["candidates"], r.get("user"), explain)
             for r in reqs]
    size = bucket(len(reqs), self.cfg.max_batch)
    shown = [b[2] for b in built]
    fmt = self.prompt[explain].answer_format
    if explain:
      examples = [base.TeacherExample(history=r["history"], slate=r["candidates"],
                                      user=r.get("user")) for r in reqs]
      res = rerank_lib.rerank(self.model, self.tok, examples, self.items, self.sids,
                              self.prompt[True], max_new_tokens=self.cfg.explain_max_new_tokens,
                              batch_size=size, constrained=(True,))[True]
      texts, omega, order, lengths = res.texts, res.omega, res.order, res.lengths
    else:
      make_constraint, budget = rerank_lib.list_ranking_constraint(
          self.tok, self.model.cfg.vocab_size, shown, fmt, size)
      ids = [b[0] for b in built]
      pre = [b[1] for b in built]
      ids += [ids[-1]] * (size - len(reqs))
      pre += [pre[-1]] * (size - len(reqs))
      kw = {}
      if self.prefix_cache is not None:
        kw = dict(prefix_cache=self.prefix_cache, prefix_lengths=pre)
      out = sampler.sample(self.model, ids, key=jax.random.key(0), max_new_tokens=budget,
                           greedy=True, stop_tokens=self.stops, pad_id=self.tok.pad_id,
                           constraint=make_constraint(0, len(reqs)),
                           prompt_multiple=self.cfg.prompt_multiple,
                           vocab_limit=self.tok.vocab_size,
                           jump_forward=self.cfg.jump_forward, forced_logprobs=False, **kw)
      toks, lens, done = (np.asarray(x) for x in (out.tokens, out.lengths, out.done))
      texts, lengths = [], []
      for j in range(len(reqs)):
        gen = toks[j, :lens[j]].tolist()
        if done[j] and gen:
          gen = gen[:-1]
        head = rerank_lib.head_ids(self.tok, fmt, shown[j][0])
        texts.append(self.tok.decode(list(head) + gen))
        lengths.append(len(gen))
      omega, order, _, _ = parser.parse_batch(texts, shown, fmt)
    answers = []
    for j, r in enumerate(reqs):
      fallback = not bool(omega[j])
      self.counts["fallback"] += int(fallback)
      self.counts["rerank"] += 1
      ans = {"ranking": [r["candidates"][int(p)] for p in order[j]], "fallback": fallback,
             "answer_tokens": int(lengths[j])}
      if explain:
        ans["explanation"] = parser.parse_ranking(texts[j], shown[j], fmt).explanation
      answers.append(ans)
    return answers

  def chat_batch(self, reqs):
    """OpenAI-style completions of chat requests that share max_tokens and temperature (dicts
    with ids, max_tokens, temperature)."""
    size = bucket(len(reqs), self.cfg.max_batch)
    budget = bucket(max(r["max_tokens"] for r in reqs), self.cfg.chat_max_tokens)
    budget = max(budget, max(r["max_tokens"] for r in reqs))
    temp = float(reqs[0]["temperature"])
    ids = [r["ids"] for r in reqs]
    ids += [ids[-1]] * (size - len(reqs))
    out = sampler.sample(self.model, ids, key=jax.random.key(next(self._seed)),
                         max_new_tokens=budget, greedy=temp == 0.0,
                         temperature=temp if temp > 0 else 1.0, stop_tokens=self.stops,
                         pad_id=self.tok.pad_id, prompt_multiple=self.cfg.prompt_multiple,
                         vocab_limit=self.tok.vocab_size)
    toks, lens, done = (np.asarray(x) for x in (out.tokens, out.lengths, out.done))
    answers = []
    for j, r in enumerate(reqs):
      gen = toks[j, :lens[j]].tolist()
      stopped = bool(done[j]) and len(gen) <= r["max_tokens"]
      gen = gen[:-1] if stopped else gen[:r["max_tokens"]]
      self.counts["chat"] += 1
      answers.append({"text": self.tok.decode(gen), "prompt_tokens": len(r["ids"]),
                      "completion_tokens": len(gen) + int(stopped),
                      "finish_reason": "stop" if stopped else "length"})
    return answers

  def warmup(self, batch_sizes=None):
    """Compiles the re-ranking path for each batch bucket and each compile shape (prefix,
    suffix and cache width buckets) that slates of the shortest or longest item lines and
    histories of 1..max_history such items reach; returns the seconds taken."""
    t0 = time.time()
    k = min(self.cfg.max_candidates, (len(self.items) - 1) // 2)
    sizes = batch_sizes or sorted({bucket(n, self.cfg.max_batch)
                                   for n in range(1, self.cfg.max_batch + 1)})
    cfg = self.prompt[False]
    line_len = lambda i: len(prompts.item_line(dict(self.items[i], sid=self.sids[i]), cfg))
    ranked = sorted(range(len(self.items)), key=line_len)
    slates = (ranked[:k], ranked[-k:])  # the shortest and the longest candidate lines
    rest = ranked[k:-k]
    m = self.cfg.prompt_multiple
    shapes = {}
    for n in range(1, min(cfg.max_history, len(rest)) + 1):
      for hist in (rest[:n], rest[-n:]):
        for cands in slates:
          ids, pre, _ = self.rerank_prompt(hist, cands, None, False)
          pre = pre if self.prefix_cache is not None else 0
          key = (-(-pre // m), -(-(len(ids) - pre) // m), -(-len(ids) // m))
          shapes.setdefault(key, (hist, cands))
    for hist, cands in shapes.values():
      for size in sizes:
        req = {"history": hist, "candidates": cands, "user": None, "explain": False}
        self.rerank_batch([req] * size)
    self.counts.clear()
    if self.prefix_cache is not None:
      self.prefix_cache.hits = self.prefix_cache.misses = 0
      self.prefix_cache._entries.clear()  # pylint: disable=protected-access
    logging.info("[serve] warm-up compiled %d prompt shapes x %d batch sizes", len(shapes),
                 len(sizes))
    return time.time() - t0


class Batcher:
  """Runs submitted requests in batches: one worker thread takes the oldest request, waits for
  more of the same kind, and runs up to `max_batch` of them together.

  How long it waits: until as many requests of the kind are queued as it expects, at most
  `max_wait_ms` past the later of the oldest request's arrival and the end of the previous
  batch. It expects the clients of the last batch back plus those that queued meanwhile (capped
  at `max_batch`; 1 at the start): a lone client is served without waiting, and closed-loop
  clients whose answers left together are batched together again, instead of splitting into a
  batch of the early returners and one of the late ones.

  Requests cancelled before their batch starts (a client that went away) are dropped and
  counted. `pause()` / `resume()` keep requests queued and release them (tests).
  """

  def __init__(self, run_batch, max_batch, max_wait_ms):
    self.run_batch = run_batch  # (kind, [payload]) -> [result]
    self.max_batch, self.max_wait = int(max_batch), float(max_wait_ms) / 1000.0
    self._queue = collections.deque()
    self._cond = threading.Condition()
    self._paused = False
    self._stop = False
    self.stats = collections.Counter()
    self.batch_sizes = collections.Counter()
    self._expect, self._t_free = 1, 0.0  # see the class docstring
    self._thread = threading.Thread(target=self._loop, name="gr2-batcher", daemon=True)
    self._thread.start()

  def submit(self, kind, payload):
    fut = concurrent.futures.Future()
    with self._cond:
      if self._stop:
        raise UserError("the server is shutting down")
      self._queue.append((kind, payload, fut, time.time()))
      self.stats["submitted"] += 1
      self._cond.notify()
    return fut

  def pending(self):
    with self._cond:
      return len(self._queue)

  def pause(self):
    """Hold the worker: requests stay queued (`pending`) until `resume`."""
    with self._cond:
      self._paused = True

  def resume(self):
    with self._cond:
      self._paused = False
      self._cond.notify()

  def close(self):
    with self._cond:
      self._stop = True
      self._cond.notify()
    self._thread.join(timeout=30)

  def _take(self):
    """The next batch [(kind, payload, future)] of one kind, or None when stopping."""
    with self._cond:
      while (not self._queue or self._paused) and not self._stop:
        self._cond.wait()
      if self._stop:
        return None
      kind, _, _, t_first = self._queue[0]
      deadline = max(t_first, self._t_free) + self.max_wait
      while True:
        same = sum(1 for q in self._queue if q[0] == kind)
        left = deadline - time.time()
        if same >= self._expect or left <= 0 or self._stop:
          break
        self._cond.wait(timeout=left)
      while self._paused and not self._stop:
        self._cond.wait()
      batch, rest = [], collections.deque()
      for q in self._queue:
        if q[0] == kind and len(batch) < self.max_batch:
          batch.append(q)
        else:
          rest.append(q)
      self._queue = rest
    return batch

  def _loop(self):
    while True:
      batch = self._take()
      if batch is None:
        return
      live = [q for q in batch if q[2].set_running_or_notify_cancel()]
      self.stats["cancelled"] += len(batch) - len(live)
      if not live:
        continue
      kind = live[0][0]
      self.batch_sizes[len(live)] += 1
      self.stats["batches"] += 1
      try:
        results = self.run_batch(kind, [q[1] for q in live])
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("[serve] batch of %d %s requests failed", len(live), kind[0])
        results = e
      self._finished(len(live))
      if isinstance(results, Exception):
        self.stats["failed"] += len(live)
        for q in live:
          q[2].set_exception(results)
        continue
      for q, res in zip(live, results):
        self.stats["done"] += 1
        q[2].set_result(res)

  def _finished(self, answered):
    """After a batch: expect its clients back, with those queued meanwhile."""
    with self._cond:
      self._expect = max(1, min(self.max_batch, answered + len(self._queue)))
      self._t_free = time.time()
