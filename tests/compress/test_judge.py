"""The judge client against a real local HTTP server that misbehaves on purpose: a good answer
is scored, and an endpoint that is down, slow, failing or answering garbage ends in the counted
fallback within a bounded time."""

import socket
import threading
import time

import fastapi
import pytest
import uvicorn

from gr2_jax.compress import judge

MODE = {"mode": "ok"}


def _app():
  app = fastapi.FastAPI()

  @app.post("/v1/chat/completions")
  async def chat(body: dict):
    mode = MODE["mode"]
    if mode == "slow":
      import asyncio  # pylint: disable=import-outside-toplevel
      await asyncio.sleep(2.0)
    if mode == "error":
      return fastapi.responses.JSONResponse({"error": "overloaded"}, status_code=503)
    if mode == "not_json":
      return fastapi.responses.PlainTextResponse("<html>oops</html>")
    content = {"ok": 'Sure. {"solvable": 1, "preservation": 5, "ranking_quality": 10}',
               "garbage": "I think it is pretty good!",
               "out_of_range": '{"solvable": 1, "preservation": 50, "ranking_quality": 10}',
               "slow": '{"solvable": 0, "preservation": 10, "ranking_quality": 10}'}[mode]
    assert body["messages"][0]["role"] == "system"
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}

  return app


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
  port = _free_port()
  srv = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="error"))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  for _ in range(100):
    if srv.started:
      break
    time.sleep(0.05)
  yield f"http://127.0.0.1:{port}"
  srv.should_exit = True
  thread.join(5)


def _client(endpoint, **kw):
  cfg = judge.JudgeConfig(endpoint=endpoint, timeout_s=0.5, max_retries=2, backoff_s=0.05,
                          fallback=0.25, **kw)
  return judge.JudgeClient(cfg)


def test_good_answer_is_scored(server):
  MODE["mode"] = "ok"
  c = _client(server)
  assert c.score("history", "summary", "candidates") == pytest.approx(0.2 * 0.5 + 0.8 * 1.0)
  assert c.summary()["calls"] == 1 and c.summary()["fallbacks"] == 0


@pytest.mark.parametrize("mode,kind", [("error", "http_503"), ("not_json", "bad_response"),
                                       ("garbage", "bad_verdict"),
                                       ("out_of_range", "bad_verdict"), ("slow", "timeout")])
def test_misbehaving_endpoint_falls_back(server, mode, kind):
  MODE["mode"] = mode
  c = _client(server)
  t0 = time.time()
  assert c.score("history", "summary", "candidates") == 0.25
  # 3 calls of at most 0.5 s plus pauses of 0.05 and 0.1 s.
  assert time.time() - t0 < 3 * 0.5 + 0.15 + 1.0
  s = c.summary()
  assert s["calls"] == 3 and s["failures"] == 3 and s["fallbacks"] == 1
  assert s["failure_kinds"] == {kind: 3}


def test_endpoint_down():
  c = _client(f"http://127.0.0.1:{_free_port()}")
  assert c.score("h", "s", "c") == 0.25
  assert c.summary()["failure_kinds"] == {"unreachable": 3}


def test_parse_verdict_never_raises():
  assert judge.parse_verdict('{"solvable": true, "preservation": 3, "ranking_quality": 4.5}') == {
      "solvable": 1, "preservation": 3.0, "ranking_quality": 4.5}
  for bad in (None, 3, "", "{", '{"solvable": 2, "preservation": 3, "ranking_quality": 4}',
              '{"solvable": 1, "preservation": "high", "ranking_quality": 4}',
              '{"solvable": 1, "preservation": 3}', "[1, 2]", '{"a": {"b": 1}}'):
    assert judge.parse_verdict(bad) is None
