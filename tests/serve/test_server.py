"""The serving engine and HTTP API on a tiny model that memorised one reasoning-free answer.

The memorised answer lists slate items 1 and 2 and omits item 3; the strict list constraint must
turn it into a permutation that keeps the memorised order. The HTTP tests run the real
FastAPI app under uvicorn on 127.0.0.1.
"""

import dataclasses
import json
import socket
import time

import httpx
import jax
import numpy as np
import pytest

from gr2_jax.errors import UserError
from gr2_jax.rerank import evaluate
from gr2_jax.sampling import constraints
from gr2_jax.sampling import sampler
from gr2_jax.serve import app as app_lib
from gr2_jax.serve import engine as engine_lib
from gr2_jax.serve import loadtest
from gr2_jax.text import chat
from gr2_jax.text import parser
from gr2_jax.text import prompts
from tests.rerank import toy

PROMPT = prompts.PromptConfig(max_history=2, include_user=False, reasoning=False)
# The candidates before the user's history: the shared prefix holds them too.
CANDIDATES_FIRST = dataclasses.replace(PROMPT, part_order="system_candidates_user")
ANSWER = prompts.render_answer([toy.SIDS[1], toy.SIDS[2]])
HISTORY, SLATE = [0], [1, 2, 3]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
  return toy.memorise(str(tmp_path_factory.mktemp("serve_tok")), ANSWER, PROMPT)


def make_engine(memorised, prompt=PROMPT, **kw):
  model, tok = memorised
  cfg = engine_lib.ServeConfig(max_candidates=3, prompt_multiple=16, **kw)
  return engine_lib.Engine(model, tok, prompt, toy.SIDS, toy.ITEMS, cfg, name="toy")


def test_memorised_answer_is_invalid_without_the_constraint(memorised):
  model, tok = memorised
  res = evaluate.rerank(model, tok, [toy.EXAMPLE], toy.ITEMS, toy.SIDS, PROMPT,
                        max_new_tokens=60, batch_size=1, constrained=(False,))[False]
  assert res.texts == [ANSWER] and res.reasons == ["missing"]


def test_answer_ways_rebuild_every_order(memorised):
  _, tok = memorised
  for fmt, shown in (("sids", [toy.SIDS[i] for i in SLATE]), ("positions", ["a"] * 12)):
    head, rows = evaluate.answer_ways(tok, shown, fmt, tok.im_end_id)
    k = len(shown)
    rng = np.random.default_rng(0)
    for _ in range(5):
      order = rng.permutation(k)
      ids = list(head)
      for n, i in enumerate(order):
        ways = rows[i][2] if n == k - 1 else rows[i][1]
        ids += list(ways[0])
      assert ids[-1] == tok.im_end_id
      text = tok.decode(ids[:-1])
      if fmt == "sids":
        assert text == prompts.render_answer([shown[i] for i in order])
      got = parser.parse_ranking(text, shown, fmt)
      assert got.omega and list(got.order) == list(order), text


def test_list_ranking_constraint_keeps_the_ways_of_a_slate(memorised):
  """The ways of a slate are tokenized once and kept: a batch whose rows share their slate, and
  the same slate again, reuse them; the constraint is the one built from `answer_ways`."""
  _, tok = memorised
  shown = [toy.SIDS[i] for i in SLATE]
  evaluate._list_ways.cache_clear()  # pylint: disable=protected-access
  make, budget = evaluate.list_ranking_constraint(tok, 512, [shown] * 3, "sids", 3)
  info = evaluate._list_ways.cache_info()  # pylint: disable=protected-access
  assert (info.misses, info.hits) == (1, 2)
  rows = [evaluate.answer_ways(tok, shown, "sids", tok.im_end_id)[1]] * 3
  want = constraints.list_constraint(rows, 512)
  got = make(0, 3)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert budget == max(sum(max(len(w) for w in going + close) for _, going, close in r)
                       for r in rows)


def test_list_constraint_masks_by_hand():
  # Row 0 lists items "a" (tokens 5 6) and "b" (7); row 1 only "b". Going on: item + 3 (comma);
  # closing: item + 4 (stop).
  rows = [[("a", ((5, 6, 3),), ((5, 6, 4),)), ("b", ((7, 3),), ((7, 4),))],
          [("b", ((7, 3),), ((7, 4),))]]
  cons = constraints.list_constraint(rows, 10)
  state = cons.init(2)
  allowed = lambda: [np.flatnonzero(r).tolist() for r in np.asarray(cons.allowed(state))]
  assert allowed() == [[5, 7], [7]]
  for tokens, want in (((5, 7), [[6], [4]]), ((6, 4), [[3], []]), ((3, 0), [[7], []]),
                       ((7, 0), [[4], []])):
    state = cons.update(state, np.asarray(tokens))
    assert allowed() == want
  state = cons.update(state, np.asarray((4, 0)))
  assert allowed() == [[], []]


def test_engine_completes_the_memorised_answer_to_a_permutation(memorised):
  eng = make_engine(memorised)
  req = {"history": HISTORY, "candidates": SLATE, "user": None, "explain": False}
  ans = eng.rerank_batch([req, dict(req, candidates=[3, 2, 1])])
  assert ans[0]["ranking"] == [1, 2, 3]  # the memorised 1, 2, then the constraint's 3
  assert sorted(ans[1]["ranking"]) == SLATE
  assert not ans[0]["fallback"] and eng.counts["fallback"] == 0
  # Both requests share the system turn and the history header: one prefill of that prefix.
  assert (eng.prefix_cache.misses, eng.prefix_cache.hits) == (1, 0)
  plain = make_engine(memorised, prefix_reuse=False).rerank_batch([req])
  assert plain[0]["ranking"] == ans[0]["ranking"]
  assert plain[0]["answer_tokens"] == ans[0]["answer_tokens"]
  # Token by token (no jump-forward): the same answers.
  step = make_engine(memorised, jump_forward=0).rerank_batch(
      [req, dict(req, candidates=[3, 2, 1])])
  assert [(a["ranking"], a["answer_tokens"]) for a in step] == [
      (a["ranking"], a["answer_tokens"]) for a in ans]


def test_candidates_first_prompt_shares_the_candidates(memorised):
  _, tok = memorised
  eng = make_engine(memorised, prompt=CANDIDATES_FIRST)
  ids, n, _ = eng.rerank_prompt(HISTORY, SLATE, None, False)
  text = tok.decode(ids[:n])
  # Everything up to the history's first item (Alpha) is shared.
  assert "Candidates (3):" in text and "Delta" in text and "Alpha" not in text
  other, m, _ = eng.rerank_prompt([2], SLATE, None, False)
  assert ids[:n] == other[:m]
  reqs = [{"history": h, "candidates": c, "user": None, "explain": False}
          for h, c in (([0], SLATE), ([2], SLATE), ([0], [3, 2, 1]), ([3], SLATE))]
  got = eng.rerank_batch(reqs)
  assert (eng.prefix_cache.misses, eng.prefix_cache.hits) == (2, 0)  # one per slate
  plain = make_engine(memorised, prompt=CANDIDATES_FIRST, prefix_reuse=False).rerank_batch(reqs)
  assert [a["ranking"] for a in got] == [a["ranking"] for a in plain]
  again = eng.rerank_batch(reqs[:2])
  assert eng.prefix_cache.hits == 1 and [a["ranking"] for a in again] == [
      a["ranking"] for a in got[:2]]


@pytest.fixture(scope="module")
def server(memorised):
  eng = make_engine(memorised, max_batch=4, max_wait_ms=20.0, chat_max_tokens=32)
  api = app_lib.create_app(eng, eng.cfg)
  with loadtest.ServerThread(api) as srv:
    srv.app = api
    yield srv


def test_rerank_and_health(server):
  r = httpx.post(server.url + "/v1/rerank", json={"history": HISTORY, "candidates": SLATE})
  assert r.status_code == 200, r.text
  body = r.json()
  assert body["ranking"] == [1, 2, 3]
  assert body["model"] == "toy" and body["latency_ms"] > 0 and "explanation" not in body
  h = httpx.get(server.url + "/healthz").json()
  assert h["status"] == "ok" and h["engine"]["rerank"] >= 1


@pytest.mark.parametrize("body,status,message", [
    ("{not json", 422, "JSON"),
    ({"history": [0]}, 422, "candidates: Field required"),
    ({"history": [0], "candidates": [1, 2], "extra": 1}, 422, "extra: Extra inputs"),
    ({"history": [0], "candidates": [1, 99]}, 400, "unknown item id(s) in candidates: [99]"),
    ({"history": [-1], "candidates": [1, 2]}, 400, "unknown item id(s) in history"),
    ({"history": [0], "candidates": [1, 2, 1]}, 400, "duplicate candidate(s) [1]"),
    ({"history": [], "candidates": [1, 2]}, 400, "history is empty"),
    ({"history": [0], "candidates": [0, 1, 2, 3]}, 400, "at most 3"),
    ({"history": [0], "candidates": [1]}, 400, "at least 2 candidates"),
])
def test_bad_requests_get_a_one_line_reason(server, body, status, message):
  if isinstance(body, str):
    r = httpx.post(server.url + "/v1/rerank", content=body,
                   headers={"content-type": "application/json"})
  else:
    r = httpx.post(server.url + "/v1/rerank", json=body)
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert message in err and "\n" not in err


def test_a_body_that_is_not_json_is_named(server):
  r = httpx.post(server.url + "/v1/rerank", data={"history": "0"})
  assert r.status_code == 415 and "must be JSON" in r.json()["error"]


def test_prompt_over_the_limit_is_refused(memorised):
  eng = make_engine(memorised, max_prompt_tokens=16)
  api = app_lib.create_app(eng, eng.cfg)
  with loadtest.ServerThread(api) as srv:
    r = httpx.post(srv.url + "/v1/rerank", json={"history": HISTORY, "candidates": SLATE})
    assert r.status_code == 400 and "the server takes at most 16" in r.json()["error"]
    r = httpx.post(srv.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hello there"}],
                         "max_tokens": 8})
    assert r.status_code == 400 and "at most 16 in all" in r.json()["error"]


def test_chat_completions_match_the_sampler(server, memorised):
  model, tok = memorised
  msgs = toy.messages(prompt=PROMPT)
  r = httpx.post(server.url + "/v1/chat/completions",
                 json={"model": "toy", "messages": msgs, "max_tokens": 32, "temperature": 0})
  assert r.status_code == 200, r.text
  body = r.json()
  ids = chat.encode_chat(msgs, tok, add_generation_prompt=True)
  ref = sampler.sample(model, [ids], key=jax.random.key(0), max_new_tokens=32, greedy=True,
                       stop_tokens=chat.chat_stop_ids(tok), pad_id=tok.pad_id)
  n = int(ref.lengths[0])
  want = tok.decode(np.asarray(ref.tokens[0, :n - 1]).tolist())
  assert want == ANSWER
  choice = body["choices"][0]
  assert body["object"] == "chat.completion" and choice["message"]["content"] == want
  assert choice["finish_reason"] == "stop"
  assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == n
  # Cut at max_tokens: finish_reason "length".
  r = httpx.post(server.url + "/v1/chat/completions",
                 json={"messages": msgs, "max_tokens": 3, "temperature": 0})
  short = r.json()["choices"][0]
  assert short["finish_reason"] == "length"
  assert short["message"]["content"] == tok.decode(np.asarray(ref.tokens[0, :3]).tolist())
  # Streamed: one content chunk, the finish chunk, [DONE].
  with httpx.stream("POST", server.url + "/v1/chat/completions",
                    json={"messages": msgs, "max_tokens": 32, "temperature": 0,
                          "stream": True}) as s:
    lines = [x for x in s.iter_lines() if x]
  assert lines[-1] == "data: [DONE]"
  chunks = [json.loads(x[len("data: "):]) for x in lines[:-1]]
  assert chunks[0]["choices"][0]["delta"]["content"] == want
  assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
  for bad, msg in (({"messages": msgs, "max_tokens": 0}, "max_tokens must be in 1..32"),
                   ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
                   ({"messages": msgs, "temperature": 5}, "temperature must be in")):
    r = httpx.post(server.url + "/v1/chat/completions", json=bad)
    assert r.status_code in (400, 422) and msg in r.json()["error"], r.text


def test_the_official_openai_client_talks_to_the_server(server):
  import openai  # pylint: disable=import-outside-toplevel
  client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
  msgs = toy.messages(prompt=PROMPT)
  out = client.chat.completions.create(model="toy", messages=msgs, max_tokens=32,
                                       temperature=0)
  assert out.choices[0].message.content == ANSWER
  assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens > 0
  stream = client.chat.completions.create(model="toy", messages=msgs, max_tokens=32,
                                          temperature=0, stream=True)
  text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
  assert text == ANSWER


def test_a_client_that_disconnects_frees_its_slot(server):
  batcher = server.app.state.batcher
  before = batcher.stats["cancelled"]
  batcher.pause()
  try:
    body = json.dumps({"history": HISTORY, "candidates": SLATE}).encode()
    host, port = server.url[len("http://"):].split(":")
    with socket.create_connection((host, int(port))) as sock:
      sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
      deadline = time.time() + 10
      while batcher.pending() == 0 and time.time() < deadline:
        time.sleep(0.01)
      assert batcher.pending() == 1
    # Half a request, then gone: never reaches the batcher.
    with socket.create_connection((host, int(port))) as sock:
      sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
    time.sleep(0.5)  # the endpoint sees the disconnect and cancels the queued request
  finally:
    batcher.resume()
  deadline = time.time() + 10
  while batcher.stats["cancelled"] == before and time.time() < deadline:
    time.sleep(0.02)
  assert batcher.stats["cancelled"] == before + 1
  r = httpx.post(server.url + "/v1/rerank", json={"history": HISTORY, "candidates": SLATE})
  assert r.status_code == 200 and sorted(r.json()["ranking"]) == SLATE


def test_concurrent_clients_get_their_own_answers(server):
  slates = [[1, 2, 3], [3, 2, 1], [2, 3, 1], [0, 1, 2], [2, 0, 3]]

  def make_request(client, n):
    return {"history": [(client + n) % 4], "candidates": slates[(client * 7 + n) % len(slates)]}

  before = server.app.state.batcher.batch_sizes.copy()
  res = loadtest.load_test(server.url, make_request, clients=8, seconds=60, max_requests=48)
  assert res["sent"] == 48 and res["answered"] == 48, res
  assert res["errors"] == 0 and res["lost"] == 0 and res["mixed_up"] == 0
  sizes = server.app.state.batcher.batch_sizes - before
  assert sum(n * c for n, c in sizes.items()) == 48
  assert max(sizes) > 1  # requests were batched together


def test_workdir_lookup(tmp_path):
  root = str(tmp_path)
  with pytest.raises(UserError, match="holds no finished"):
    engine_lib.find_model_dir(root)
  for stage in ("rl", "internalize", "sft"):
    d = tmp_path / stage / "abc"
    d.mkdir(parents=True)
    (d / "prompt.json").write_text("{}")
    if stage != "internalize":  # an unfinished internalize run is passed over
      (d / "done.json").write_text("{}")
    (tmp_path / stage / "latest").symlink_to("abc")
  assert engine_lib.find_model_dir(root) == str((tmp_path / "rl" / "abc").resolve())
  assert engine_lib.slate_size(root) is None
  legacy = tmp_path / "legacy" / "f"
  legacy.mkdir(parents=True)
  (legacy / "config.json").write_text(json.dumps({"stage": "legacy",
                                                  "section": {"slate_size": 12}}))
  (tmp_path / "legacy" / "latest").symlink_to("f")
  assert engine_lib.slate_size(root) == 12


def test_warmup_compiles_and_leaves_no_trace(memorised):
  eng = make_engine(memorised, max_batch=2)
  assert eng.warmup() > 0
  assert not eng.counts and len(eng.prefix_cache) == 0
  assert (eng.prefix_cache.hits, eng.prefix_cache.misses) == (0, 0)
  req = {"history": HISTORY, "candidates": SLATE, "user": None, "explain": False}
  assert eng.rerank_batch([req])[0]["ranking"] == [1, 2, 3]
