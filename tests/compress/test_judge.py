"""The judge client against a real local HTTP server that misbehaves on purpose: a good answer
is scored, and an endpoint that is down, slow, failing or answering garbage ends in the counted
fallback within a bounded time. A local checkpoint judges without a server."""

import os
import socket
import threading
import time

import fastapi
import ml_collections
import pytest
import uvicorn

from gr2_jax import config_lib
from gr2_jax.compress import judge
from gr2_jax.compress import train
from gr2_jax.errors import UserError
from gr2_jax.models import artifact
from gr2_jax.parallel import runtime
from tests.rerank import toy

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


VERDICT = '{"solvable": 1, "preservation": 5, "ranking_quality": 10}'


@pytest.fixture(scope="module")
def memorised_judge(tmp_path_factory):
  """A tiny model that memorised the rubric's verdict for one (history, summary, candidates),
  saved as a model artifact."""
  msgs = judge.messages("Alpha (1991)", "likes dramas", "Bravo, Charlie")
  msgs.append({"role": "assistant", "content": VERDICT})
  model, tok = toy.memorise_chat(str(tmp_path_factory.mktemp("judge_tok")), msgs)
  out = str(tmp_path_factory.mktemp("judge_ckpt"))
  artifact.save_model(out, model, tok)
  return out


def test_local_checkpoint_judges_without_a_server(memorised_judge):
  """`compress.judge.checkpoint`: the artifact is loaded and answers in this process; its
  memorised verdict is scored as the rubric says, one summary alone or in a batch."""
  c = ml_collections.ConfigDict({"quality": "utility+judge", "judge": {
      "endpoint": "", "checkpoint": memorised_judge, "batch_size": 2, "model": "judge",
      "timeout_s": 1.0, "max_retries": 2, "backoff_s": 0.0, "max_tokens": 40,
      "fallback": 0.25}})
  client = train.make_judge(c, runtime.for_devices(None, num_devices=1))
  assert client.url is None and client.complete is not None
  want = 0.2 * 0.5 + 0.8 * 1.0
  assert client.score("Alpha (1991)", "likes dramas", "Bravo, Charlie") == pytest.approx(want)
  many = client.score_many(["Alpha (1991)"] * 3, ["likes dramas"] * 3, ["Bravo, Charlie"] * 3)
  assert many == pytest.approx([want] * 3)
  s = client.summary()
  assert (s["summaries"], s["calls"], s["failures"], s["fallbacks"]) == (4, 4, 0, 0)


def test_local_judge_garbage_or_error_falls_back_counted():
  cfg = judge.JudgeConfig(checkpoint="x", fallback=0.25)
  texts = iter([["no verdict", VERDICT], None])

  def complete(chats):
    out = next(texts)
    if out is None:
      raise RuntimeError("prompt of 9000 tokens is longer than the cache\nmore detail")
    assert len(chats) == len(out) and chats[0][0]["content"] == judge.RUBRIC
    return out

  client = judge.JudgeClient(cfg, complete)
  assert client.score_many(["h", "h"], ["s", "t"], ["c", "c"]) == [0.25, pytest.approx(0.9)]
  assert client.score_many(["h"], ["s"], ["c"]) == [0.25]  # the completer raised
  s = client.summary()
  assert s["failure_kinds"] == {"bad_verdict": 1, "local_error": 1}
  assert (s["summaries"], s["calls"], s["fallbacks"]) == (3, 3, 2)


def test_judge_config_needs_exactly_one_judge():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c = config_lib.load_config_module(os.path.join(root, "configs", "compress.py")).get_config(
      "tiny").compress
  c.quality = "judge"
  with pytest.raises(UserError, match="set one of compress.judge.endpoint"):
    train.check_config(c)
  c.judge.endpoint, c.judge.checkpoint = "http://127.0.0.1:1", "/tmp/x"
  with pytest.raises(UserError, match="set one of"):
    train.check_config(c)
  c.judge.endpoint = ""
  train.check_config(c)
  with pytest.raises(UserError, match="/tmp/x holds no model"):
    train.make_judge(c, runtime.for_devices(None, num_devices=1))
