"""The HTTP API (FastAPI): re-ranking, OpenAI-compatible chat completions, health.

  POST /v1/rerank             {"history": [ids], "candidates": [ids], "explain": false,
                               "user": {"age": 25, ...}?}
                              -> {"ranking", "explanation"?, "model", "latency_ms", "fallback"}
  POST /v1/chat/completions   {"messages", "max_tokens", "temperature", "stream"} (OpenAI)
  GET  /healthz               {"status", "model", "queue", counters}

Item ids are the catalogue's (the data artifact's `items.json` ids). A request the model
cannot answer gets a 400 with a one-line `error`; a malformed body a 422 with a one-line `error`.
A client that disconnects before its batch runs frees its slot (the batcher drops it).
"""

import asyncio
import contextlib
import json
import time
import uuid
from typing import List, Literal, Optional

from absl import logging
import fastapi
from fastapi import responses
from fastapi.exceptions import RequestValidationError
import pydantic

from gr2_jax.errors import UserError
from gr2_jax.serve import engine as engine_lib

_POLL_S = 0.05  # how often a waiting request checks that its client is still there


class RerankRequest(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid")
  history: List[int]
  candidates: List[int]
  explain: bool = False
  user: Optional[dict] = None


class Message(pydantic.BaseModel):
  role: Literal["system", "user", "assistant"]
  content: str


class ChatRequest(pydantic.BaseModel):
  model: Optional[str] = None
  messages: List[Message]
  max_tokens: Optional[int] = None
  temperature: float = 1.0
  stream: bool = False


def _one_line(exc):
  """The first problem of a validation error, in one line."""
  errs = exc.errors()
  if not errs:
    return "invalid request"
  e = errs[0]
  where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
  more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
  return f"{where or 'body'}: {e.get('msg', 'invalid')}{more}"


def create_app(engine: engine_lib.Engine, cfg: engine_lib.ServeConfig, started=None):
  """The FastAPI app serving `engine` through a `Batcher` (`app.state.batcher`)."""

  def run_batch(kind, payloads):
    if kind[0] == "rerank":
      return engine.rerank_batch(payloads)
    return engine.chat_batch(payloads)

  batcher = engine_lib.Batcher(run_batch, cfg.max_batch, cfg.max_wait_ms)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    batcher.close()

  app = fastapi.FastAPI(title="gr2_jax re-ranker", lifespan=lifespan)
  app.state.batcher = batcher
  app.state.engine = engine
  app.state.started = started or time.time()

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, exc):
    kind = request.headers.get("content-type", "")
    if request.method == "POST" and "json" not in kind:
      return responses.JSONResponse(
          {"error": f"the body must be JSON (Content-Type: application/json), got "
                    f"{kind or 'no content type'}"}, status_code=415)
    return responses.JSONResponse({"error": _one_line(exc)}, status_code=422)

  @app.exception_handler(UserError)
  async def _user_error(_, exc):
    return responses.JSONResponse({"error": str(exc).splitlines()[0]}, status_code=400)

  async def _wait(request, fut):
    """The future's result, or None when the client went away first (its slot is freed)."""
    wrapped = asyncio.wrap_future(fut)
    while True:
      done, _ = await asyncio.wait({wrapped}, timeout=_POLL_S)
      if done:
        return wrapped.result()
      if await request.is_disconnected():
        fut.cancel()
        return None

  @app.get("/healthz")
  def healthz():
    return {"status": "ok", "model": engine.name, "queue": batcher.pending(),
            "uptime_s": round(time.time() - app.state.started, 1),
            "batcher": dict(batcher.stats), "engine": dict(engine.counts),
            "prefix_cache": ({"entries": len(engine.prefix_cache),
                              "hits": engine.prefix_cache.hits,
                              "misses": engine.prefix_cache.misses}
                             if engine.prefix_cache is not None else None)}

  @app.post("/v1/rerank")
  async def rerank(req: RerankRequest, request: fastapi.Request):
    t0 = time.time()
    rid = uuid.uuid4().hex[:12]
    engine.check_rerank(req.history, req.candidates)
    # The prompt is built (and its length checked) here, so a bad request never joins a batch.
    engine.rerank_prompt(req.history, req.candidates, req.user, req.explain)
    payload = {"history": req.history, "candidates": req.candidates, "user": req.user,
               "explain": req.explain}
    fut = batcher.submit(("rerank", len(req.candidates), bool(req.explain)), payload)
    ans = await _wait(request, fut)
    if ans is None:
      logging.info("[serve] rerank %s: client disconnected", rid)
      return responses.Response(status_code=499)
    latency = (time.time() - t0) * 1000.0
    logging.info("[serve] rerank %s k=%d explain=%s latency_ms=%.1f fallback=%s", rid,
                 len(req.candidates), req.explain, latency, ans["fallback"])
    out = {"id": rid, "ranking": ans["ranking"], "model": engine.name,
           "latency_ms": round(latency, 2), "fallback": ans["fallback"]}
    if req.explain:
      out["explanation"] = ans.get("explanation")
    return out

  @app.post("/v1/chat/completions")
  async def chat_completions(req: ChatRequest, request: fastapi.Request):
    t0 = time.time()
    max_tokens = cfg.chat_max_tokens if req.max_tokens is None else req.max_tokens
    if not 1 <= max_tokens <= cfg.chat_max_tokens:
      raise UserError(f"max_tokens must be in 1..{cfg.chat_max_tokens}, got {max_tokens}")
    if not 0.0 <= req.temperature <= 2.0:
      raise UserError(f"temperature must be in [0, 2], got {req.temperature}")
    if not req.messages:
      raise UserError("messages is empty")
    ids = engine.check_chat([m.model_dump() for m in req.messages], max_tokens)
    payload = {"ids": ids, "max_tokens": max_tokens, "temperature": req.temperature}
    fut = batcher.submit(("chat", engine_lib.bucket(max_tokens, cfg.chat_max_tokens),
                          float(req.temperature)), payload)
    ans = await _wait(request, fut)
    if ans is None:
      return responses.Response(status_code=499)
    cid = "chatcmpl-" + uuid.uuid4().hex[:16]
    created = int(time.time())
    logging.info("[serve] chat %s prompt=%d completion=%d latency_ms=%.1f", cid,
                 ans["prompt_tokens"], ans["completion_tokens"], (time.time() - t0) * 1000.0)
    usage = {"prompt_tokens": ans["prompt_tokens"], "completion_tokens": ans["completion_tokens"],
             "total_tokens": ans["prompt_tokens"] + ans["completion_tokens"]}
    if req.stream:
      def chunk(delta, finish):
        return "data: " + json.dumps({
            "id": cid, "object": "chat.completion.chunk", "created": created,
            "model": engine.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

      def events():
        yield chunk({"role": "assistant", "content": ans["text"]}, None)
        yield chunk({}, ans["finish_reason"])
        yield "data: [DONE]\n\n"

      return responses.StreamingResponse(events(), media_type="text/event-stream")
    return {"id": cid, "object": "chat.completion", "created": created, "model": engine.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ans["text"]},
                         "finish_reason": ans["finish_reason"]}],
            "usage": usage}

  return app
