"""A server on a loopback port in a background thread, and a closed-loop load test against it.

`ServerThread` runs uvicorn on 127.0.0.1 (port 0: any free one) beside the caller, for tests and
the benchmark. `load_test` runs `clients` concurrent clients, each sending re-ranking requests
one after another until `seconds` pass or `max_requests` are sent, and checks every answer
against its own request (a permutation of exactly its candidates): none lost, none mixed up.
"""

import asyncio
import threading
import time

import httpx
import numpy as np
import uvicorn


class ServerThread:
  """uvicorn serving `app` on 127.0.0.1 in a daemon thread; `url` once started."""

  def __init__(self, app, port=0):
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                log_level="warning", lifespan="on"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self):
    self.thread.start()
    deadline = time.time() + 60
    while not self.server.started:
      if not self.thread.is_alive() or time.time() > deadline:
        raise RuntimeError("the server did not start")
      time.sleep(0.02)
    port = self.server.servers[0].sockets[0].getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(timeout=30)


def percentiles(latencies_ms):
  if not latencies_ms:
    return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
  p = np.percentile(np.asarray(latencies_ms), [50, 95, 99])
  return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}


async def _client(http, url, make_request, stop_at, quota, out, cid):
  n = 0
  while time.time() < stop_at and quota():
    body = make_request(cid, n)
    n += 1
    out["sent"] += 1
    t0 = time.time()
    try:
      r = await http.post(url + "/v1/rerank", json=body)
    except httpx.TimeoutException:
      out["lost"] += 1  # no answer within the timeout
      continue
    except httpx.HTTPError as e:
      out["errors"].append(f"{type(e).__name__}: {e}")
      continue
    ms = (time.time() - t0) * 1000.0
    if r.status_code != 200:
      out["errors"].append(f"HTTP {r.status_code}: {r.text[:200]}")
      continue
    ranking = r.json().get("ranking")
    if sorted(ranking or []) != sorted(body["candidates"]):
      out["mixed_up"] += 1
    out["latencies_ms"].append(ms)
    out["fallback"] += int(bool(r.json().get("fallback")))


async def _run(url, make_request, clients, seconds, max_requests, timeout_s):
  out = {"latencies_ms": [], "errors": [], "mixed_up": 0, "fallback": 0, "sent": 0, "lost": 0}
  sent = [0]

  def quota():
    if max_requests and sent[0] >= max_requests:
      return False
    sent[0] += 1
    return True

  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  t0 = time.time()
  async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
    await asyncio.gather(*[_client(http, url, make_request, t0 + seconds, quota, out, c)
                           for c in range(clients)])
  out["seconds"] = time.time() - t0
  return out


def load_test(url, make_request, *, clients, seconds, max_requests=0, timeout_s=120.0):
  """Closed-loop load: `clients` concurrent clients for `seconds` (or `max_requests` in all).

  make_request(client, n) -> a /v1/rerank body. Returns counts (sent; answered; errors: HTTP
  errors and failed connections; lost: no answer within `timeout_s`; mixed_up: an answer that is
  not a permutation of its own request's candidates), requests/s and latency percentiles (ms).
  """
  out = asyncio.run(_run(url, make_request, clients, seconds, max_requests, timeout_s))
  answered = len(out["latencies_ms"])
  return {"clients": clients, "seconds": round(out["seconds"], 2), "sent": out["sent"],
          "answered": answered, "errors": len(out["errors"]),
          "lost": out["lost"], "error_samples": out["errors"][:3],
          "mixed_up": out["mixed_up"], "fallback": out["fallback"],
          "requests_per_s": answered / max(out["seconds"], 1e-9),
          **{k + "_ms": v for k, v in percentiles(out["latencies_ms"]).items()}}
