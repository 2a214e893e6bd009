"""The generic trainer: a pure jitted train step and a thin driver around it.

The step (`make_train_step`) maps (state, batch) -> (state, metrics) with the state donated.
State is {"params": pure dict of the model's parameters, "opt_state": optax state, "step"}.
A batch holds `micro_batches` micro-batches ([M, B, T] arrays from `packing.pack` rows); the
step sums the weighted token losses and their gradients over them and divides once by the
total weight, so the result is the per-token mean over the whole batch, however unevenly the
tokens fall into micro-batches.

The driver (`Trainer.fit`) owns the data iterator, logging, evaluation and checkpoints. The
data order comes from a grain `MapDataset` (`batch_dataset`); its iterator state is saved in
each checkpoint's metadata, so a resumed run reads exactly the batches an uninterrupted one
would have read. SIGTERM makes the driver save after the step in flight and raise `Preempted`.
"""

import dataclasses
import functools
import signal
import threading
import time
from typing import Callable, Optional

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gr2_jax.errors import UserError
from gr2_jax.models import qwen3
from gr2_jax.parallel import sharding as sharding_lib
from gr2_jax.train import checkpoint as ckpt_lib
from gr2_jax.train import metrics_log
from gr2_jax.train import optim
from gr2_jax.train import packing

DEVICE_FIELDS = ("tokens", "positions", "segment_ids", "targets", "weights")
# Sequence positions per log-softmax chunk of the loss: [B, 128, V] logits at most.
LOSS_CHUNK = 128
_COMPILED = {}


class Preempted(SystemExit):
  """Raised after a SIGTERM once the checkpoint of the last finished step is saved."""

  def __init__(self, step):
    super().__init__(143)
    self.step = step


def token_loss(graphdef, params, batch, loss_chunk=LOSS_CHUNK):
  """(sum of weighted token NLLs, sum of weights) of one [B, T] batch.

  The log-softmax runs over `loss_chunk` positions at a time (`qwen3.token_logps`), so at most
  [B, loss_chunk, V] logits are alive, in the backward pass too.
  """
  logp = qwen3.token_logps(graphdef, params, batch["tokens"], batch["positions"],
                           batch["targets"], segment_ids=batch["segment_ids"], chunk=loss_chunk)
  w = batch["weights"].astype(jnp.float32)
  return -jnp.sum(logp * w), jnp.sum(w)


def make_train_step(graphdef, tx, schedule, loss_chunk=LOSS_CHUNK, frozen_layers=0,
                    loss_fn=None):
  """The pure train step (state, batch [M, B, T]) -> (state, metrics).

  With `frozen_layers` the loss sees the frozen parameters through `optim.stop_frozen`, so no
  gradient is computed below the first trained layer. `loss_fn` (an `Objective.loss`) replaces
  the token loss.
  """
  if loss_fn is None:
    loss_fn = functools.partial(token_loss, loss_chunk=loss_chunk)

  def step_fn(state, batch):
    params = state["params"]
    grad_fn = jax.value_and_grad(
        lambda p, mb: loss_fn(graphdef, optim.stop_frozen(p, frozen_layers), mb), has_aux=True)

    def micro(carry, mb):
      g_acc, l_acc, w_acc = carry
      (l, w), g = grad_fn(params, mb)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, w_acc + w), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (g, l, w), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batch)
    denom = jnp.maximum(w, 1.0)
    grads = jax.tree.map(lambda x, p: (x / denom).astype(p.dtype), g, params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {"loss": l / denom, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state["step"]), "tokens": w}
    return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return step_fn


def accumulated_grads(graphdef, params, batch, loss_chunk=LOSS_CHUNK):
  """(loss, grads) of the step's objective on a [M, B, T] batch, without an update (for tests)."""

  def total(p):
    def micro(carry, mb):
      l, w = token_loss(graphdef, p, mb, loss_chunk)
      return (carry[0] + l, carry[1] + w), None
    (l, w), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.float32(0)), batch)
    return l / jnp.maximum(w, 1.0)

  return jax.value_and_grad(total)(params)


def batch_dataset(rows, batch_size, micro_batches=1, seed=0, shuffle=True, boxes=None):
  """An endless grain MapDataset of batches {field: [M, B, T]} drawn from packed `rows`.

  Each pass over the rows is a fresh seeded shuffle; batch k is a pure function of (rows,
  seed, k), which is what makes resuming exact. `boxes` ({field: slices of [M, B, ...]}, from
  `Trainer.batches`): each batch holds only that part of the global batch (this process's
  rows), gathered from the rows alone.
  """
  n = len(next(iter(rows.values())))
  per_step = batch_size * micro_batches
  if n < per_step:
    raise UserError(f"{n} packed rows cannot fill one step of {micro_batches} x {batch_size} "
                    "rows; lower the batch size or add data")
  import grain  # pylint: disable=g-import-not-at-top  (the step itself needs no data loader)
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None).batch(per_step, drop_remainder=True)

  def gather(idx):
    idx = np.asarray(idx).reshape(micro_batches, batch_size)
    if boxes is None:
      return {k: v[idx] for k, v in rows.items()}
    return {k: v[idx[boxes[k][:2]]][(slice(None), slice(None)) + boxes[k][2:]]
            for k, v in rows.items()}

  return ds.map(gather)


def count_tokens(batch):
  """The real (non-padding) tokens of a packed batch: the token loss's throughput numerator."""
  return int((batch["segment_ids"] > 0).sum())


def token_step_flops(model_cfg, shape, frozen_layers=0):
  """Model FLOPs of one step of a decoder on packed token rows of `shape` ([M, B, T])."""
  return metrics_log.model_flops_per_token(model_cfg, shape[-1], frozen_layers) * np.prod(shape)


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a step minimises, for models other than the decoder's next-token loss.

  loss: (graphdef, params, micro-batch) -> (sum of weighted losses, sum of weights); the step
    divides the sums over its micro-batches once, as for tokens.
  fields: the batch fields put on the devices.
  count: numpy batch [M, B, ...] -> units processed (the throughput's numerator).
  unit: what `count` counts ("tokens", "slates"): the log's `<unit>_per_sec`.
  flops: batch shape [M, B, ...] -> model FLOPs of one step, for the MFU (None: not logged).
  """
  loss: Callable
  fields: tuple
  count: Callable
  unit: str = "tokens"
  flops: Optional[Callable] = None


@dataclasses.dataclass
class TrainerConfig:
  """Driver settings."""
  num_steps: int
  micro_batches: int = 1
  log_every: int = 10
  eval_every: int = 0  # 0 = only at the end
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  peak_flops: float = 0.0  # per device; 0 = measure a large matmul once
  task_names: tuple = ()
  loss_chunk: int = LOSS_CHUNK  # positions per log-softmax chunk (0 = one chunk of T)


def optimizer_state_shardings(abs_opt, param_shardings, default):
  """Shardings of an optimiser state: a moment leaf (AdamW's mu, nu) takes the sharding of the
  parameter whose path ends its own path, the rest (counters) `default`. Works through
  `optax.multi_transform`, whose moments cover only some parameters (frozen layers)."""
  by_path = {tuple(k.key for k in path): s
             for path, s in jax.tree_util.tree_leaves_with_path(param_shardings)}

  def one(path, leaf):
    tail = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      tail.append(k.key)
    s = by_path.get(tuple(reversed(tail)))
    return s if s is not None and len(s.spec) <= len(leaf.shape) else default

  return jax.tree_util.tree_map_with_path(one, abs_opt)


class Trainer:
  """Drives the jitted step over a `batch_dataset`, with logging, evals and checkpoints."""

  def __init__(self, model: nnx.Module, optim_cfg: optim.OptimConfig, cfg: TrainerConfig, *,
               mesh, workdir: str, rules=None, trainable_rows=None, name: str = "train",
               objective: Optional[Objective] = None):
    """`model` is a `qwen3.Qwen3` trained on packed token rows, or any nnx module with an
    `objective` saying how its batches are scored."""
    self.cfg = cfg
    self.objective = objective
    self.mesh = mesh
    self.rules = rules
    self.workdir = workdir
    self.name = name
    self.model_cfg = model.cfg
    self.graphdef, abs_state = nnx.split(model)
    params = nnx.to_pure_dict(abs_state)
    optim.check_frozen_layers(params, optim_cfg.frozen_layers)
    self.frozen_layers = optim_cfg.frozen_layers
    self.param_shardings = nnx.to_pure_dict(
        sharding_lib.state_shardings(nnx.state(model), mesh, rules))
    self.schedule = optim.lr_schedule(optim_cfg)
    rows = None if trainable_rows is None else tuple(int(r) for r in np.unique(trainable_rows))
    self.tx = optim.make_optimizer(
        optim_cfg, trainable_rows=rows,
        vocab_size=None if rows is None else model.cfg.vocab_size)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abs_opt = jax.eval_shape(self.tx.init, params)
    opt_shardings = optimizer_state_shardings(abs_opt, self.param_shardings, replicated)
    self.state_shardings = {"params": self.param_shardings, "opt_state": opt_shardings,
                            "step": replicated}
    self._init_params = jax.device_put(params, self.param_shardings)
    # Compiled functions are shared by trainers of the same model, optimiser and mesh (a
    # resumed phase or a second trainer in one process does not compile again).
    key = (self.graphdef, optim_cfg, rows, mesh, sharding_lib.normalize_rules(rules),
           cfg.loss_chunk, objective)
    if key not in _COMPILED:
      loss_fn = (functools.partial(token_loss, loss_chunk=cfg.loss_chunk) if objective is None
                 else objective.loss)
      step_fn = make_train_step(self.graphdef, self.tx, self.schedule, cfg.loss_chunk,
                                optim_cfg.frozen_layers, loss_fn=loss_fn)
      _COMPILED[key] = (
          jax.jit(step_fn, in_shardings=(self.state_shardings, None),
                  out_shardings=(self.state_shardings, None), donate_argnums=0),
          jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"]),
          jax.jit(functools.partial(loss_fn, self.graphdef)))
    self._step, self._opt_init, self._eval = _COMPILED[key]
    self._stop = threading.Event()
    self._feed = None  # set by `batches` when each process feeds its part of the batch

  def _batch_sharding(self, shape):
    """[M, B, T] token fields split over "batch" and "length"; other fields over "batch"."""
    axes = ((None, "batch", "length") if self.objective is None
            else (None, "batch") + (None,) * (len(shape) - 2))
    spec = sharding_lib.logical_to_spec(axes[:len(shape)], self.rules, self.mesh, shape)
    return jax.sharding.NamedSharding(self.mesh, spec)

  def batches(self, rows, batch_size, micro_batches=1, seed=0, shuffle=True):
    """`batch_dataset` of `rows` for `fit`. With several processes each batch holds only this
    process's part of the global batch (its devices' rows: `sharding.process_box`), gathered
    from the rows by this process alone; `fit` assembles the global arrays
    (`jax.make_array_from_process_local_data`), so each host reads and transfers only its
    rows, and the batches (and losses) are those of a one-process run."""
    self._feed = None
    if jax.process_count() == 1:
      return batch_dataset(rows, batch_size, micro_batches, seed, shuffle)
    shapes = {k: (micro_batches, batch_size) + np.shape(v)[1:] for k, v in rows.items()}
    boxes = {}
    try:
      for k in self.fields:
        boxes[k] = sharding_lib.process_box(self._batch_sharding(shapes[k]), shapes[k])
    except ValueError as e:
      logging.warning("[%s] every process reads the whole batch: %s", self.name, e)
      return batch_dataset(rows, batch_size, micro_batches, seed, shuffle)
    lead = boxes[self.fields[0]][:2]
    for k, shape in shapes.items():  # host-side fields (task ids) follow the batch's rows
      boxes.setdefault(k, lead + tuple(slice(0, n) for n in shape[2:]))
    held = lead[1].stop - lead[1].start
    # Host-side counts are summed over processes; rows that several processes hold (a batch
    # axis not split across all of them) are counted once.
    self._feed = {"shapes": shapes, "copies": jax.process_count() * held / batch_size}
    logging.info("[%s] process %d reads rows %d..%d of each global batch of %d", self.name,
                 jax.process_index(), lead[1].start, lead[1].stop, batch_size)
    return batch_dataset(rows, batch_size, micro_batches, seed, shuffle, boxes=boxes)

  def _to_devices(self, batch):
    """A batch from `batches` as global arrays on the mesh."""
    if self._feed is None:
      return {k: jax.device_put(batch[k], self._batch_sharding(batch[k].shape))
              for k in self.fields}
    shapes = self._feed["shapes"]
    return {k: sharding_lib.make_global(batch[k], self._batch_sharding(shapes[k]), shapes[k])
            for k in self.fields}

  def _global_counts(self, counts):
    """Host-side counts of this process's part of a batch summed over the processes."""
    if self._feed is None:
      return counts
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    total = np.asarray(multihost_utils.process_allgather(np.asarray(counts, np.float64)))
    return total.sum(0) / self._feed["copies"]

  @property
  def fields(self):
    return DEVICE_FIELDS if self.objective is None else tuple(self.objective.fields)

  @property
  def unit(self):
    return "tokens" if self.objective is None else self.objective.unit

  def _count(self, batch):
    if self.objective is None:
      return count_tokens(batch)
    return int(self.objective.count(batch))

  def _step_flops(self, shape):
    """Model FLOPs of one step on a global batch whose first field has `shape`."""
    if self.objective is None:
      return token_step_flops(self.model_cfg, shape, self.frozen_layers)
    if self.objective.flops is None:
      return None
    return self.objective.flops(shape)

  def init_state(self):
    with sharding_lib.use_rules(self.mesh, self.rules):
      opt_state = self._opt_init(self._init_params)
    step = jax.device_put(jnp.int32(0), self.state_shardings["step"])
    return {"params": self._init_params, "opt_state": opt_state, "step": step}

  def initial_params(self):
    """A copy of the parameters the trainer started from (a step donates the state's own)."""
    return jax.tree.map(jnp.copy, self._init_params)

  def abstract_state(self):
    """ShapeDtypeStructs (with shardings) of the train state: the target of a restore."""
    shapes = jax.eval_shape(lambda p: {"params": p, "opt_state": self.tx.init(p),
                                       "step": jnp.int32(0)}, self._init_params)
    return ckpt_lib.abstract_like(shapes, self.state_shardings)

  def model(self, params):
    return nnx.merge(self.graphdef, params)

  def evaluate_loss(self, params, rows, batch_size):
    """Weight-averaged mean loss of `rows` (dict of [N, ...]: packed tokens by default)."""
    total = weight = 0.0
    n = len(rows[self.fields[0]])
    with sharding_lib.use_rules(self.mesh, self.rules):
      for i in range(0, n - batch_size + 1, batch_size):
        b = {k: jnp.asarray(rows[k][i:i + batch_size]) for k in self.fields}
        l, w = self._eval(params, b)
        total += float(l)
        weight += float(w)
    return total / max(weight, 1.0)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("[%s] SIGTERM: saving a checkpoint after the current step", self.name)
    self._stop.set()

  def fit(self, dataset, *, eval_fn: Optional[Callable] = None,
          on_step: Optional[Callable] = None):
    """Trains to `cfg.num_steps` (resuming from the last checkpoint); returns (params, summary).

    Args:
      dataset: from `batch_dataset`.
      eval_fn: (params, step) -> dict of floats, run every `eval_every` steps and at the end.
      on_step: (step) -> None after each step, before its checkpoint (tests use it).
    """
    cfg = self.cfg
    names = tuple(cfg.task_names)
    manager = ckpt_lib.CheckpointManager(f"{self.workdir}/ckpt",
                                         max_to_keep=cfg.keep_checkpoints)
    it = iter(dataset.to_iter_dataset())
    task_tokens = {n: 0.0 for n in names}
    history = []
    start = manager.latest_step()
    if start is None:
      state, start = self.init_state(), 0
    else:
      state, meta = manager.restore(self.abstract_state())
      it.set_state(meta["data"])
      task_tokens.update(meta.get("task_tokens", {}))
      history = meta.get("history", [])
      logging.info("[%s] resumed at step %d from %s", self.name, start, manager.directory)
    peak = cfg.peak_flops or metrics_log.measure_peak_flops()
    flops_per_step = None
    logger = metrics_log.MetricsLogger(f"{self.workdir}/tb", cfg.num_steps, f"[{self.name}] ")
    previous = None
    if threading.current_thread() is threading.main_thread():
      previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._stop.clear()
    t_window, tok_window, steps_window, t_start = None, 0, 0, time.time()
    train_seconds, train_tokens, train_steps = 0.0, 0, 0
    try:
      for step in range(start, cfg.num_steps):
        batch = next(it)
        counts = self._global_counts(
            [self._count(batch)]
            + [float(batch["weights"][batch["task"] == k].sum()) for k in range(len(names))])
        real = int(round(counts[0]))
        for n, c in zip(names, counts[1:]):
          task_tokens[n] += float(c)
        if step == start:
          first = self.fields[0]
          flops_per_step = self._step_flops(
              batch[first].shape if self._feed is None else self._feed["shapes"][first])
        dev = self._to_devices(batch)
        with sharding_lib.use_rules(self.mesh, self.rules):
          state, metrics = self._step(state, dev)
        done = step + 1
        if t_window is None:  # the first step compiles; time from its end
          jax.block_until_ready(metrics)
          t_window = time.time()
        else:
          tok_window += real
          steps_window += 1
        if done % cfg.log_every == 0 or done == cfg.num_steps:
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          now = time.time()
          if steps_window:
            dt = now - t_window
            m[f"{self.unit}_per_sec"] = tok_window / dt
            if flops_per_step is not None:
              m["mfu"] = flops_per_step * steps_window / dt / (peak * self.mesh.size)
            m["step_seconds"] = dt / steps_window
            train_seconds += dt
            train_tokens += tok_window
            train_steps += steps_window
          t_window, tok_window, steps_window = now, 0, 0
          for n in names:
            m[f"task_tokens/{n}"] = task_tokens[n]
          logger.write(done, m)
          eta = m.get("step_seconds", 0) * (cfg.num_steps - done)
          logger.progress(done, m, eta)
          history.append({"step": done, "loss": m["loss"], "lr": m["lr"],
                          "grad_norm": m["grad_norm"]})
        if on_step is not None:
          on_step(done)
        if eval_fn is not None and ((cfg.eval_every and done % cfg.eval_every == 0)
                                    or done == cfg.num_steps):
          ev = eval_fn(state["params"], done)
          logger.write(done, ev, kind="eval")
          logging.info("[%s] eval at step %d: %s", self.name, done,
                       " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        stop = self._stop.is_set()
        if done % cfg.checkpoint_every == 0 or done == cfg.num_steps or stop:
          manager.save(done, state, {"data": it.get_state(), "task_tokens": task_tokens,
                                     "history": history}, force=True)
        if stop:
          raise Preempted(done)
    finally:
      if previous is not None:
        signal.signal(signal.SIGTERM, previous)
      logger.close()
      manager.close()  # waits for the saves in flight, also when a step raised
    summary = {
        "steps": cfg.num_steps, "resumed_from": start,
        "wall_seconds": round(time.time() - t_start, 1),
        f"{self.unit}_per_sec": train_tokens / train_seconds if train_seconds else None,
        "mfu": (flops_per_step * train_steps / train_seconds / (peak * self.mesh.size)
                if train_seconds and flops_per_step is not None else None),
        "task_tokens": task_tokens, "loss_history": history,
        "peak_flops_per_device": peak,
    }
    return state["params"], summary


def fit_examples(model, examples, *, steps, batch_size, learning_rate, weight_decay, clip_norm,
                 mesh, rules, workdir, name, pad_id, seed, frozen_layers=0):
  """`steps` SFT steps of `model` on (ids, loss weights) `examples`, packed into rows as long as
  the longest, batches of `batch_size` (at most the rows), a 2-step warm-up then cosine decay;
  checkpoints in `workdir` resume. Returns (trained model, {steps, first_loss, final_loss,
  wall_seconds})."""
  rows = packing.pack(examples, max(len(ids) for ids, _ in examples), pad_id)
  ocfg = optim.OptimConfig(learning_rate=learning_rate, warmup_steps=min(2, steps - 1),
                           total_steps=steps, weight_decay=weight_decay, clip_norm=clip_norm,
                           frozen_layers=frozen_layers)
  tr = Trainer(model, ocfg, TrainerConfig(num_steps=steps, log_every=10), mesh=mesh, rules=rules,
               workdir=workdir, name=name)
  params, summary = tr.fit(tr.batches(rows, min(batch_size, len(rows["tokens"])), seed=seed))
  hist = summary["loss_history"]
  return tr.model(params), {"steps": steps, "first_loss": hist[0]["loss"] if hist else None,
                            "final_loss": hist[-1]["loss"] if hist else None,
                            "wall_seconds": summary["wall_seconds"]}
