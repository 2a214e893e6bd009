"""RQ-VAE semantic-ID tokenizer: MLP autoencoder with a residual quantiser in the latent.

Every technique of the papers is a config switch: k-means initialisation of each level on the
residuals, EMA codebook updates, the diversity loss, dead-code reset, the co-engagement
contrastive loss and the random last level (see `codes.random_last_level`). The train step is
a pure jitted function (`TrainState` in, `TrainState` out) that runs `chunk` steps in a
`lax.scan`; `train` is the thin driver that samples batches, logs and checkpoints.
"""

import dataclasses
import os
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from gr2_jax.errors import UserError
from gr2_jax.sids import kmeans as kmeans_lib


@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
  """Architecture, losses and techniques of one RQ-VAE run."""
  input_dim: int = 384
  hidden_dims: tuple = (256, 128)
  latent_dim: int = 32
  num_levels: int = 3  # learned levels written before the disambiguation level
  codebook_size: int = 256
  random_last_level: bool = True  # False: the last level is learned like the others
  beta: float = 0.25
  ema: bool = True
  ema_decay: float = 0.99
  ema_eps: float = 1e-5
  kmeans_init: str = "all"  # none | batch | all
  kmeans_iters: int = 20
  kmeans_seeding: str = "kmeans++"  # or random
  diversity_weight: float = 0.0
  diversity_mode: str = "soft"  # soft | hard (hard usage, soft straight-through gradient)
  diversity_temperature: float = 1.0
  dead_code_reset: bool = False
  dead_code_steps: int = 100  # tau: steps without use before a code is re-initialised
  contrastive_weight: float = 0.0
  contrastive_temperature: float = 0.1
  learning_rate: float = 1e-3
  batch_size: int = 256
  steps: int = 3000
  chunk: int = 100  # steps per jitted call; logging and checkpoints happen between calls
  seed: int = 0

  @property
  def quantized_levels(self):
    return self.num_levels + (0 if self.random_last_level else 1)


def validate(cfg, num_items):
  """Raises UserError on a config that cannot train on `num_items` items."""
  if num_items < cfg.codebook_size:
    raise UserError(f"catalogue of {num_items} items is smaller than the codebook size "
                    f"{cfg.codebook_size}; lower sids codebook_size")
  if cfg.kmeans_init not in ("none", "batch", "all"):
    raise UserError(f"sids kmeans_init={cfg.kmeans_init!r}; valid: none, batch, all")
  if cfg.kmeans_seeding not in ("kmeans++", "random"):
    raise UserError(f"sids kmeans_seeding={cfg.kmeans_seeding!r}; valid: kmeans++, random")
  if cfg.diversity_mode not in ("soft", "hard"):
    raise UserError(f"sids diversity_mode={cfg.diversity_mode!r}; valid: soft, hard")
  if cfg.num_levels < 1 or cfg.steps < 0 or cfg.chunk < 1 or cfg.batch_size < 2:
    raise UserError("sids num_levels, batch_size and chunk must be positive and steps >= 0")
  if not 0.0 < cfg.ema_decay < 1.0:
    raise UserError(f"sids ema_decay={cfg.ema_decay} must lie in (0, 1)")


class RQVAE(nnx.Module):
  """MLP encoder input -> latent and decoder latent -> input (the quantiser lives outside)."""

  def __init__(self, cfg, *, rngs):
    dims = (cfg.input_dim, *cfg.hidden_dims, cfg.latent_dim)
    self.enc = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    rev = dims[::-1]
    self.dec = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(rev[:-1], rev[1:])])

  @staticmethod
  def _mlp(layers, x):
    for i, layer in enumerate(layers):
      x = layer(x)
      if i + 1 < len(layers):
        x = jax.nn.silu(x)
    return x

  def encode(self, x):
    return self._mlp(self.enc, x)

  def decode(self, z):
    return self._mlp(self.dec, z)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  params: dict  # RQVAE parameters as a pure dict
  codebooks: jax.Array  # [Lq, C, dz]
  ema_count: jax.Array  # [Lq, C]
  ema_sum: jax.Array  # [Lq, C, dz]
  unused: jax.Array  # [Lq, C] steps since each code was last chosen
  opt_state: object
  step: jax.Array


def quantize(z, codebooks):
  """Residual quantisation of z [B, dz] -> dict of per-level codes, vectors and residuals."""
  residual = z
  codes, qs, residuals, dists = [], [], [], []
  for level in range(codebooks.shape[0]):
    d = kmeans_lib.sq_distances(residual, codebooks[level])  # [B, C]
    idx = jnp.argmin(d, -1)
    q = codebooks[level][idx]
    codes.append(idx)
    qs.append(q)
    residuals.append(residual)
    dists.append(d)
    # The chain sees stop_gradient(q) so commitment and codebook terms stay separate.
    residual = residual - jax.lax.stop_gradient(q)
  return {"codes": jnp.stack(codes, -1), "q": jnp.stack(qs), "residuals": jnp.stack(residuals),
          "dists": jnp.stack(dists)}


class Tokenizer:
  """Pure functions of one RQ-VAE configuration (model graph, losses, train step)."""

  def __init__(self, cfg):
    self.cfg = cfg
    model = nnx.eval_shape(lambda: RQVAE(cfg, rngs=nnx.Rngs(0)))
    self.graphdef, self._abstract = nnx.split(model)
    self.optimizer = optax.adam(cfg.learning_rate)

  def _model(self, params):
    state = jax.tree.map(lambda x: x, self._abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def _trainable(self, state):
    if self.cfg.ema:
      return {"params": state.params}
    return {"params": state.params, "codebooks": state.codebooks}

  def init(self, key, x=None):
    """Fresh state; with `x` ([n, input_dim]) and kmeans_init, codebooks from RQ-KMeans."""
    cfg = self.cfg
    k_model, k_cb, k_km = jax.random.split(key, 3)
    params = nnx.to_pure_dict(nnx.state(RQVAE(cfg, rngs=nnx.Rngs(k_model))))
    c = cfg.codebook_size
    codebooks = jax.random.uniform(k_cb, (cfg.quantized_levels, c, cfg.latent_dim),
                                   minval=-1.0 / c, maxval=1.0 / c)
    if x is not None and cfg.kmeans_init != "none":
      z = self._model(params).encode(jnp.asarray(x))
      codebooks, _, _ = kmeans_lib.residual_kmeans(k_km, z, cfg.quantized_levels, c,
                                                   cfg.kmeans_iters, cfg.kmeans_seeding)
    state = TrainState(params=params, codebooks=codebooks,
                       ema_count=jnp.ones(codebooks.shape[:2]),
                       ema_sum=jnp.array(codebooks, copy=True),  # no aliasing: donated
                       unused=jnp.zeros(codebooks.shape[:2], jnp.int32), opt_state=None,
                       step=jnp.zeros((), jnp.int32))
    state.opt_state = self.optimizer.init(self._trainable(state))
    return state

  def losses(self, trainable, state, x, x_pos, has_pos):
    """Total loss and its parts for one batch (x [B, D]; x_pos, has_pos for contrastive)."""
    cfg = self.cfg
    codebooks = trainable.get("codebooks", state.codebooks)
    model = self._model(trainable["params"])
    z = model.encode(x)
    qz = quantize(z, codebooks)
    zq = qz["q"].sum(0)
    x_hat = model.decode(z + jax.lax.stop_gradient(zq - z))  # straight-through estimator
    per_item = jnp.mean((x - x_hat) ** 2, -1)
    sg_q = jax.lax.stop_gradient(qz["q"])
    parts = {"recon": per_item.mean(),
             "commit": jnp.mean(jnp.sum((qz["residuals"] - sg_q) ** 2, -1))}
    total = parts["recon"] + cfg.beta * parts["commit"]
    if not cfg.ema:
      sg_r = jax.lax.stop_gradient(qz["residuals"])
      parts["codebook"] = jnp.mean(jnp.sum((sg_r - qz["q"]) ** 2, -1))
      total += parts["codebook"]
    if cfg.diversity_weight > 0:
      parts["diversity"] = diversity_loss(qz["dists"][:cfg.num_levels], cfg.diversity_mode,
                                          cfg.diversity_temperature)
      total += cfg.diversity_weight * parts["diversity"]
    if cfg.contrastive_weight > 0:
      parts["contrastive"] = info_nce(z, model.encode(x_pos), has_pos,
                                      cfg.contrastive_temperature)
      total += cfg.contrastive_weight * parts["contrastive"]
    return total, (parts, qz, per_item)

  def ema_update(self, state, codebooks, qz):
    cfg = self.cfg
    onehot = jax.nn.one_hot(qz["codes"].T, cfg.codebook_size)  # [Lq, B, C]
    counts = onehot.sum(1)
    sums = jnp.einsum("lbc,lbd->lcd", onehot, jax.lax.stop_gradient(qz["residuals"]))
    d = cfg.ema_decay
    ema_count = d * state.ema_count + (1 - d) * counts
    ema_sum = d * state.ema_sum + (1 - d) * sums
    n = ema_count.sum(-1, keepdims=True)
    smoothed = (ema_count + cfg.ema_eps) / (n + cfg.codebook_size * cfg.ema_eps) * n  # Laplace
    return ema_sum / smoothed[..., None], ema_count, ema_sum

  def reset_dead_codes(self, codebooks, ema_count, ema_sum, unused, qz, per_item, key):
    """Re-initialises codes unused for tau steps to the residuals of the worst items."""
    worst = jnp.argsort(-per_item)  # badly reconstructed items first
    cand = qz["residuals"][:, worst]  # [Lq, B, dz]
    dead = unused >= self.cfg.dead_code_steps  # [Lq, C]
    rank = (jnp.cumsum(dead, -1) - 1) % cand.shape[1]
    pick = jnp.take_along_axis(cand, rank[..., None], 1)
    pick = pick + 1e-3 * jnp.std(cand) * jax.random.normal(key, pick.shape)
    pick = jax.lax.stop_gradient(pick)
    codebooks = jnp.where(dead[..., None], pick, codebooks)
    ema_sum = jnp.where(dead[..., None], pick, ema_sum)
    ema_count = jnp.where(dead, 1.0, ema_count)
    return codebooks, ema_count, ema_sum, jnp.where(dead, 0, unused)

  def train_step(self, state, emb, idx, pos_idx, has_pos, key):
    """One optimisation step on batch `idx` of the embedding table; returns (state, metrics)."""
    cfg = self.cfg
    x, x_pos = emb[idx], emb[pos_idx]
    grad_fn = jax.value_and_grad(self.losses, has_aux=True)
    trainable = self._trainable(state)
    (total, (parts, qz, per_item)), grads = grad_fn(trainable, state, x, x_pos, has_pos)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    codebooks = trainable.get("codebooks", state.codebooks)
    ema_count, ema_sum = state.ema_count, state.ema_sum
    if cfg.ema:
      codebooks, ema_count, ema_sum = self.ema_update(state, codebooks, qz)
    used = jax.nn.one_hot(qz["codes"].T, cfg.codebook_size).sum(1) > 0
    unused = jnp.where(used, 0, state.unused + 1)
    if cfg.dead_code_reset:
      codebooks, ema_count, ema_sum, unused = self.reset_dead_codes(
          codebooks, ema_count, ema_sum, unused, qz, per_item, key)
    metrics = dict(parts, total=total, batch_usage=used.mean(-1))
    new = TrainState(params=trainable["params"], codebooks=codebooks, ema_count=ema_count,
                     ema_sum=ema_sum, unused=unused, opt_state=opt_state, step=state.step + 1)
    return new, metrics

  def train_chunk(self, state, emb, idx, pos_idx, has_pos, key):
    """`idx.shape[0]` train steps in one scan; metrics averaged over them."""
    keys = jax.random.split(key, idx.shape[0])

    def body(s, inputs):
      return self.train_step(s, emb, *inputs)

    state, metrics = jax.lax.scan(body, state, (idx, pos_idx, has_pos, keys))
    return state, jax.tree.map(lambda m: m.mean(0), metrics)

  def encode(self, state, x):
    """Codes [N, Lq] and reconstruction [N, D] of inputs x [N, D]."""
    model = self._model(state.params)
    qz = quantize(model.encode(x), state.codebooks)
    return qz["codes"].astype(jnp.int32), model.decode(qz["q"].sum(0))


def diversity_loss(dists, mode="soft", temperature=1.0):
  """C * sum_j p_j^2 averaged over levels; p = batch code usage (1 when uniform).

  dists [L, B, C] are squared distances to the codes. "soft" usage is the mean softmax of
  -dists / temperature; "hard" uses the argmin counts with the soft gradient.
  """
  c = dists.shape[-1]
  soft = jax.nn.softmax(-dists / temperature, -1).mean(1)  # [L, C]
  usage = soft
  if mode == "hard":
    hard = jax.nn.one_hot(jnp.argmin(dists, -1), c).mean(1)
    usage = hard + soft - jax.lax.stop_gradient(soft)
  return jnp.mean(c * jnp.sum(usage ** 2, -1))


def info_nce(za, zp, mask, temperature):
  """InfoNCE of anchors za vs positives zp [B, dz], in-batch negatives; rows with mask only."""
  za = za / jnp.maximum(jnp.linalg.norm(za, axis=-1, keepdims=True), 1e-12)
  zp = zp / jnp.maximum(jnp.linalg.norm(zp, axis=-1, keepdims=True), 1e-12)
  logits = za @ zp.T / temperature
  nll = -jnp.diagonal(jax.nn.log_softmax(logits, -1))
  m = mask.astype(nll.dtype)
  return jnp.sum(nll * m) / jnp.maximum(m.sum(), 1.0)


class PositiveSampler:
  """Samples, for each anchor, one item it co-occurred with (CSR over (a, b) pairs)."""

  def __init__(self, a, b, num_items):
    order = np.argsort(a, kind="stable")
    self.targets = np.asarray(b)[order]
    self.deg = np.bincount(np.asarray(a), minlength=num_items)
    self.start = np.concatenate([[0], np.cumsum(self.deg)[:-1]])

  def sample(self, rng, anchors):
    deg = self.deg[anchors]
    has = deg > 0
    off = (rng.random(anchors.shape) * np.maximum(deg, 1)).astype(np.int64)
    pos = np.where(has, self.targets[np.minimum(self.start[anchors] + off,
                                                max(len(self.targets) - 1, 0))]
                   if len(self.targets) else anchors, anchors)
    return pos.astype(np.int32), has


def _batches(cfg, num_items, sampler, first_step, num_steps):
  """Host-side batch indices for steps [first_step, first_step + num_steps), seeded by step."""
  idx, pos, has = [], [], []
  for step in range(first_step, first_step + num_steps):
    rng = np.random.default_rng([cfg.seed, step])
    i = rng.permutation(num_items)[:cfg.batch_size].astype(np.int32)
    if sampler is None:
      p, h = i, np.zeros(i.shape, bool)
    else:
      p, h = sampler.sample(rng, i)
    idx.append(i)
    pos.append(p)
    has.append(h)
  return np.stack(idx), np.stack(pos), np.stack(has)


_TOKENIZERS = {}


def tokenizer_for(cfg):
  """One Tokenizer (and compiled train step) per configuration; steps and seed do not matter."""
  key = dataclasses.replace(cfg, steps=0, seed=0)
  if key not in _TOKENIZERS:
    tok = Tokenizer(cfg)
    tok.jitted_chunk = jax.jit(tok.train_chunk, donate_argnums=0)
    _TOKENIZERS[key] = tok
  return _TOKENIZERS[key]


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def train(cfg, emb, pairs=None, ckpt_dir=None, save_every=1000, log=True):
  """Trains an RQ-VAE on embeddings [N, D]; resumes from `ckpt_dir` when it holds a checkpoint.

  Args:
    cfg: RQVAEConfig.
    emb: item embeddings [N, input_dim].
    pairs: (a, b) co-engagement pairs for the contrastive loss, or None.
    ckpt_dir: orbax checkpoint folder, or None for no checkpoints.
    save_every: checkpoint period in steps (rounded up to whole chunks).
    log: log progress every chunk.

  Returns:
    (tokenizer, final TrainState).
  """
  emb = jnp.asarray(emb, jnp.float32)
  n = emb.shape[0]
  validate(cfg, n)
  if emb.shape[1] != cfg.input_dim:
    raise UserError(f"embeddings have width {emb.shape[1]}, the RQ-VAE expects "
                    f"{cfg.input_dim}")
  tok = tokenizer_for(cfg)
  sampler = None
  if cfg.contrastive_weight > 0:
    if pairs is None or len(pairs[0]) == 0:
      raise UserError("sids contrastive_weight > 0 needs co-engaged item pairs from training "
                      "interactions, and none were found")
    sampler = PositiveSampler(pairs[0], pairs[1], n)
  key = jax.random.PRNGKey(cfg.seed)
  init_x = None
  if cfg.kmeans_init == "all":
    init_x = emb
  elif cfg.kmeans_init == "batch":
    init_x = emb[_batches(cfg, n, None, 0, 1)[0][0]]
  # Committed to one device like a restored state, so both share one compiled step.
  state = jax.device_put(tok.init(jax.random.fold_in(key, 0), init_x), jax.devices()[0])
  manager = None
  if ckpt_dir:
    manager = ocp.CheckpointManager(
        os.path.abspath(ckpt_dir), options=ocp.CheckpointManagerOptions(max_to_keep=1))
    latest = manager.latest_step()
    if latest is not None:
      restored = manager.restore(latest, args=ocp.args.StandardRestore(_abstract(state)))
      # Same leaves under the original tree structure (optax NamedTuples), so the compiled
      # step is reused.
      state = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(restored))
      logging.info("rqvae: resumed from step %d in %s", latest, ckpt_dir)
  chunk_fn = tok.jitted_chunk
  step = int(state.step)
  start = time.time()
  since_save = 0
  while step < cfg.steps:
    k = min(cfg.chunk, cfg.steps - step)
    idx, pos, has = _batches(cfg, n, sampler, step, k)
    state, m = chunk_fn(state, emb, idx, pos, has, jax.random.fold_in(key, step + 1))
    step += k
    since_save += k
    if log:
      parts = " ".join(f"{name}={float(v):.4f}" for name, v in sorted(m.items())
                       if name != "batch_usage")
      active = np.asarray(state.unused < cfg.chunk).mean(-1)
      logging.info("rqvae step %d/%d %s | codes active per level %s (%.1fs)", step, cfg.steps,
                   parts, " ".join(f"{a:.2f}" for a in active), time.time() - start)
    if manager and (since_save >= save_every or step >= cfg.steps):
      manager.save(step, args=ocp.args.StandardSave(state))
      manager.wait_until_finished()
      since_save = 0
  if manager:
    manager.close()
  return tok, state
