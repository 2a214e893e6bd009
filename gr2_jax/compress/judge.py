"""An LLM judge of summaries: over an OpenAI-compatible `/v1/chat/completions` endpoint, or a
local checkpoint run in this process.

The judge reads the full context, the summary and the candidates, and answers the rubric as
strict JSON: {"solvable": 0 or 1, "preservation": 1-10, "ranking_quality": 1-10}. Any endpoint
that speaks the OpenAI chat API serves: a hosted model, vLLM, or this project's own server
(`python -m gr2_jax.serve --workdir=W`, which serves a trained checkpoint). A local checkpoint
(`JudgeConfig.checkpoint`: any model artifact folder of this project with its tokenizer) needs no
server: the summaries of a batch are judged in one greedy decoding pass of the on-device
sampler.

Nothing the judge does can crash or hang a run: each endpoint call has a timeout, failures
(refused connection, timeout, HTTP error, an answer that is not the rubric's JSON) are retried
up to `max_retries` times with a growing pause, then the summary gets the `fallback` score; a
local judge's answer that is not the rubric's JSON gets the fallback at once (its greedy answer
would not change on a retry), as does a local decoding error. Calls, failures, fallbacks and
latencies are counted (`JudgeClient.stats`).
"""

import dataclasses
import json
import re
import time
from typing import Optional

import httpx
from absl import logging

from gr2_jax.compress import rewards

RUBRIC = (
    "You grade a summary of a user's history written for a recommender. Given the full "
    "history, the summary and the candidate items, answer JSON only:\n"
    '{"solvable": 0 or 1, "preservation": 1-10, "ranking_quality": 1-10}\n'
    "solvable: 1 if the summary alone is enough to rank the candidates well; preservation: how "
    "much of the history's ranking-relevant information the summary keeps; ranking_quality: "
    "how well a ranker could order the candidates from the summary.")
_OBJECT = re.compile(r"\{[^{}]*\}")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  endpoint: str = ""  # base URL, e.g. http://127.0.0.1:8000 (/v1/chat/completions is added)
  checkpoint: str = ""  # or a model artifact folder judged in this process (no server)
  batch_size: int = 8  # a local judge's decoding batch
  model: str = "judge"
  timeout_s: float = 10.0
  max_retries: int = 2
  backoff_s: float = 0.5
  max_tokens: int = 64
  fallback: float = 0.5  # the score of a summary the judge could not grade


def parse_verdict(text) -> Optional[dict]:
  """The rubric's fields from the judge's answer, or None; never raises. Takes the first JSON
  object in the text; fields must be present with solvable in {0, 1} and the scores in 1..10."""
  if not isinstance(text, str):
    return None
  for m in _OBJECT.finditer(text):
    try:
      obj = json.loads(m.group(0))
    except ValueError:
      continue
    try:
      solvable = obj["solvable"]
      p, q = obj["preservation"], obj["ranking_quality"]
      if isinstance(solvable, bool):
        solvable = int(solvable)
      if solvable not in (0, 1) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                       or not 1 <= v <= 10 for v in (p, q)):
        return None
      return {"solvable": int(solvable), "preservation": float(p), "ranking_quality": float(q)}
    except (KeyError, TypeError):
      return None
  return None


def messages(context, summary, candidates):
  """The judge's chat: the rubric, then the history, the summary and the candidates."""
  return [{"role": "system", "content": RUBRIC},
          {"role": "user", "content": f"History:\n{context}\n\nSummary:\n{summary}\n\n"
                                      f"Candidates:\n{candidates}"}]


def local_completer(model, tok, max_tokens, batch_size):
  """complete(list of chats) -> their greedy answers (texts) from `model` in this process."""
  from gr2_jax.rerank import evaluate as rerank_lib  # pylint: disable=g-import-not-at-top
  from gr2_jax.text import chat  # pylint: disable=g-import-not-at-top

  def complete(chats):
    ids = [chat.encode_chat(m, tok, add_generation_prompt=True) for m in chats]
    responses, _, finished, _ = rerank_lib.generate(
        model, tok, ids, max_new_tokens=max_tokens, batch_size=batch_size, greedy=True)
    return [tok.decode(r[:-1] if f and r else r) for r, f in zip(responses, finished)]

  return complete


class JudgeClient:
  """Scores summaries with the judge; `stats` counts what happened. `complete`: a local judge
  (`local_completer`), used instead of the endpoint."""

  def __init__(self, cfg: JudgeConfig, complete=None):
    if not cfg.endpoint and complete is None:
      raise ValueError("the judge needs an endpoint or a local checkpoint "
                       "(compress.judge.endpoint or compress.judge.checkpoint)")
    self.cfg = cfg
    self.complete = complete
    self.url = cfg.endpoint.rstrip("/") + "/v1/chat/completions" if cfg.endpoint else None
    self._http = httpx.Client(timeout=cfg.timeout_s) if complete is None else None
    self.where = self.url or f"local checkpoint {cfg.checkpoint or '(in memory)'}"
    self.stats = {"summaries": 0, "calls": 0, "failures": 0, "fallbacks": 0,
                  "latency_s_sum": 0.0, "failure_kinds": {}}

  def close(self):
    if self._http is not None:
      self._http.close()

  def _fail(self, kind):
    self.stats["failures"] += 1
    self.stats["failure_kinds"][kind] = self.stats["failure_kinds"].get(kind, 0) + 1

  def _call(self, messages):
    """The verdict of one call, or None (a failure, counted)."""
    self.stats["calls"] += 1
    t0 = time.time()
    try:
      resp = self._http.post(self.url, json={
          "model": self.cfg.model, "messages": messages, "max_tokens": self.cfg.max_tokens,
          "temperature": 0.0})
    except httpx.TimeoutException:
      self._fail("timeout")
      return None
    except httpx.HTTPError:
      self._fail("unreachable")
      return None
    finally:
      self.stats["latency_s_sum"] += time.time() - t0
    if resp.status_code != 200:
      self._fail(f"http_{resp.status_code}")
      return None
    try:
      text = resp.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
      self._fail("bad_response")
      return None
    verdict = parse_verdict(text)
    if verdict is None:
      self._fail("bad_verdict")
    return verdict

  @staticmethod
  def _value(verdict):
    return float(rewards.judge_score(verdict["solvable"], verdict["preservation"],
                                     verdict["ranking_quality"]))

  def _fallback(self):
    self.stats["fallbacks"] += 1
    if self.stats["fallbacks"] in (1, 10, 100, 1000):
      logging.warning("[compress] judge at %s failed %d time(s) (%s); %d summaries scored with "
                      "the fallback %.2f", self.where, self.stats["failures"],
                      self.stats["failure_kinds"], self.stats["fallbacks"], self.cfg.fallback)
    return float(self.cfg.fallback)

  def score(self, context, summary, candidates):
    """r_judge of one summary (the fallback after max_retries + 1 failed calls)."""
    if self.complete is not None:
      return self.score_many([context], [summary], [candidates])[0]
    self.stats["summaries"] += 1
    chat_messages = messages(context, summary, candidates)
    for attempt in range(self.cfg.max_retries + 1):
      verdict = self._call(chat_messages)
      if verdict is not None:
        return self._value(verdict)
      if attempt < self.cfg.max_retries:
        time.sleep(self.cfg.backoff_s * (2 ** attempt))
    return self._fallback()

  def score_many(self, contexts, summaries, candidates):
    """r_judge of each summary: one batched decoding pass for a local judge, calls one by one
    to an endpoint."""
    if self.complete is None:
      return [self.score(c, s, k) for c, s, k in zip(contexts, summaries, candidates)]
    chats = [messages(c, s, k) for c, s, k in zip(contexts, summaries, candidates)]
    self.stats["summaries"] += len(chats)
    self.stats["calls"] += len(chats)
    t0 = time.time()
    try:
      texts = self.complete(chats)
    except Exception as e:  # pylint: disable=broad-except
      # A local decoding failure (e.g. a chat longer than the model's context) must not end
      # the run: every summary of the batch gets the fallback, counted.
      logging.warning("[compress] local judge failed: %s", str(e).splitlines()[0][:300])
      texts = [None] * len(chats)
      kind = "local_error"
    else:
      kind = "bad_verdict"
    finally:
      self.stats["latency_s_sum"] += time.time() - t0
    out = []
    for text in texts:
      verdict = parse_verdict(text)
      if verdict is None:
        self._fail(kind)
        out.append(self._fallback())
      else:
        out.append(self._value(verdict))
    return out

  def summary(self):
    s = dict(self.stats)
    s["mean_latency_s"] = s.pop("latency_s_sum") / max(s["calls"], 1)
    return s
