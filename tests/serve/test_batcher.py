"""The server's batcher without a model: how long a batch waits and what it holds."""

import threading
import time

from gr2_jax.serve import engine as engine_lib


class _Runner:
  """run_batch that records each batch and, when `hold` is cleared, blocks until it is set."""

  def __init__(self):
    self.batches, self.started = [], []
    self.hold = threading.Event()
    self.hold.set()
    self.running = threading.Event()

  def __call__(self, kind, payloads):
    self.started.append(time.time())
    self.batches.append(list(payloads))
    self.running.set()
    self.hold.wait(timeout=30)
    return [p * 10 for p in payloads]


def test_a_lone_request_does_not_wait():
  run = _Runner()
  b = engine_lib.Batcher(run, max_batch=4, max_wait_ms=5000)
  try:
    for i in range(3):  # one client, one request at a time
      t0 = time.time()
      assert b.submit("k", i).result(timeout=30) == 10 * i
      assert run.started[-1] - t0 < 2.5  # not the 5 s max_wait
    assert run.batches == [[0], [1], [2]]
  finally:
    b.close()


def test_clients_of_a_batch_are_batched_together_again():
  """Two requests queue while a batch of 4 runs, longer than max_wait. When it ends, the old
  rule (wait max_wait past the oldest arrival) would run those 2 at once and the 4 returning
  clients apart; the batcher waits for the 4 clients it expects and runs 4 + the rest."""
  run = _Runner()
  b = engine_lib.Batcher(run, max_batch=4, max_wait_ms=1500)
  try:
    b.pause()
    first = [b.submit("k", i) for i in range(4)]
    run.hold.clear()
    b.resume()
    assert run.running.wait(timeout=30)
    late = [b.submit("k", 10 + i) for i in range(2)]
    time.sleep(2.0)  # the queued pair is now older than max_wait
    run.hold.set()
    assert [f.result(timeout=30) for f in first] == [0, 10, 20, 30]
    back = [b.submit("k", 20 + i) for i in range(4)]  # the 4 clients return at once
    assert [f.result(timeout=30) for f in late] == [100, 110]
    assert [f.result(timeout=30) for f in back] == [200, 210, 220, 230]
    assert run.batches == [[0, 1, 2, 3], [10, 11, 20, 21], [22, 23]]
    assert b.batch_sizes == {4: 2, 2: 1}
  finally:
    b.close()


def test_the_wait_is_bounded_when_the_clients_do_not_come_back():
  run = _Runner()
  b = engine_lib.Batcher(run, max_batch=4, max_wait_ms=300)
  try:
    b.pause()
    first = [b.submit("k", i) for i in range(4)]
    b.resume()
    for f in first:
      f.result(timeout=30)
    t0 = time.time()
    assert b.submit("k", 9).result(timeout=30) == 90  # 4 expected, 1 comes: max_wait, then run
    waited = run.started[-1] - t0
    assert 0.25 <= waited < 5.0
    assert run.batches[-1] == [9]
  finally:
    b.close()
