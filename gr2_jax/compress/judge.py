"""An LLM judge of summaries over an OpenAI-compatible `/v1/chat/completions` endpoint.

The judge reads the full context, the summary and the candidates, and answers the rubric as
strict JSON: {"solvable": 0 or 1, "preservation": 1-10, "ranking_quality": 1-10}. Any endpoint
that speaks the OpenAI chat API serves: a hosted model, vLLM, or this project's own server
(`python -m gr2_jax.serve --workdir=W`, which serves a trained checkpoint).

Nothing the endpoint does can crash or hang a run: each call has a timeout, failures (refused
connection, timeout, HTTP error, an answer that is not the rubric's JSON) are retried up to
`max_retries` times with a growing pause, then the summary gets the `fallback` score; calls,
failures, fallbacks and latencies are counted (`JudgeClient.stats`).
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
  endpoint: str  # base URL, e.g. http://127.0.0.1:8000 (the path /v1/chat/completions is added)
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


class JudgeClient:
  """Scores summaries with the judge; `stats` counts what happened."""

  def __init__(self, cfg: JudgeConfig):
    if not cfg.endpoint:
      raise ValueError("the judge needs an endpoint (compress.judge.endpoint)")
    self.cfg = cfg
    self.url = cfg.endpoint.rstrip("/") + "/v1/chat/completions"
    self._http = httpx.Client(timeout=cfg.timeout_s)
    self.stats = {"summaries": 0, "calls": 0, "failures": 0, "fallbacks": 0,
                  "latency_s_sum": 0.0, "failure_kinds": {}}

  def close(self):
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

  def score(self, context, summary, candidates):
    """r_judge of one summary (the fallback after max_retries + 1 failed calls)."""
    self.stats["summaries"] += 1
    messages = [{"role": "system", "content": RUBRIC},
                {"role": "user", "content": f"History:\n{context}\n\nSummary:\n{summary}\n\n"
                                            f"Candidates:\n{candidates}"}]
    for attempt in range(self.cfg.max_retries + 1):
      verdict = self._call(messages)
      if verdict is not None:
        return float(rewards.judge_score(verdict["solvable"], verdict["preservation"],
                                         verdict["ranking_quality"]))
      if attempt < self.cfg.max_retries:
        time.sleep(self.cfg.backoff_s * (2 ** attempt))
    self.stats["fallbacks"] += 1
    if self.stats["fallbacks"] in (1, 10, 100, 1000):
      logging.warning("[compress] judge at %s failed %d time(s) (%s); %d summaries scored with "
                      "the fallback %.2f", self.url, self.stats["failures"],
                      self.stats["failure_kinds"], self.stats["fallbacks"], self.cfg.fallback)
    return float(self.cfg.fallback)

  def summary(self):
    s = dict(self.stats)
    s["mean_latency_s"] = s.pop("latency_s_sum") / max(s["calls"], 1)
    return s
