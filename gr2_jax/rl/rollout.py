"""Rollouts for RL: G sampled answers per re-ranking prompt on the on-device sampler, parsed
with Omega and scored by a registered reward.

Each of the G samples of a prompt may see its own shuffle of the slate (`shuffle=True`, the
default against position bias); the labels follow the items, so the target's input rank and the
grades are those of the order the sample was shown, and the output order is read in shown
positions. With `shuffle=False` every sample sees the legacy order.
"""

import dataclasses

import jax
import numpy as np

from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.rl.registry import REWARDS
from gr2_jax.sampling import sampler
from gr2_jax.teachers import base
from gr2_jax.text import chat
from gr2_jax.text import parser


@dataclasses.dataclass
class Rollouts:
  """N = P * G rollouts, row p * G + g being sample g of prompt p."""
  prompts: list  # prompt ids per rollout
  responses: list  # response ids (stop token included when emitted)
  logps: list  # rollout log-probs of the response tokens
  texts: list  # decoded answers (stop token dropped)
  lengths: np.ndarray  # int32 [N] response tokens
  finished: np.ndarray  # bool [N] stopped by a stop token (not truncated)
  perm: np.ndarray  # int [N, K]: shown position j holds legacy slate position perm[j]
  target_index: np.ndarray  # int [N] target's shown position
  grades: np.ndarray  # int [N, K] graded labels in shown order
  omega: np.ndarray  # bool [N]
  order: np.ndarray  # int [N, K] output order in shown positions (identity where invalid)
  reasons: list
  group_size: int


def slate_permutations(num_prompts, group_size, k, shuffle, rng):
  """int [P, G, K]: the slate order each sample is shown (identity when not shuffled)."""
  if not shuffle:
    return np.tile(np.arange(k), (num_prompts, group_size, 1))
  return np.argsort(rng.random((num_prompts, group_size, k)), axis=-1)


def rollout(model, tok, slates, items, sids, prompt_cfg, users=None, *, group_size, shuffle,
            key, rng, max_new_tokens, temperature=1.0, batch_size=64):
  """Samples `group_size` answers for each slate of the stacked records `slates`."""
  examples = base.examples_from_slates(slates, users)
  p, k = slates["slate"].shape
  perms = slate_permutations(p, group_size, k, shuffle, rng)
  shown, perm_rows = [], []
  for i, ex in enumerate(examples):
    for g in range(group_size):
      perm = perms[i, g]
      shown.append(dataclasses.replace(ex, slate=tuple(ex.slate[j] for j in perm)))
      perm_rows.append(perm)
  prompt_ids = rerank_lib.prompt_ids(shown, items, sids, prompt_cfg, tok)
  stops = chat.chat_stop_ids(tok)
  responses, logps, finished = [], [], []
  n = len(prompt_ids)
  for s in range(0, n, batch_size):
    batch = list(prompt_ids[s:s + batch_size])
    real = len(batch)
    batch += [batch[-1]] * (batch_size - real)  # one compilation for every batch
    out = sampler.sample(model, batch, key=jax.random.fold_in(key, s), max_new_tokens=max_new_tokens,
                         temperature=temperature, stop_tokens=stops, pad_id=tok.pad_id,
                         prompt_multiple=64, vocab_limit=tok.vocab_size)
    toks, lps = np.asarray(out.tokens), np.asarray(out.logprobs)
    lens, done = np.asarray(out.lengths), np.asarray(out.done)
    for j in range(real):
      responses.append(toks[j, :lens[j]].tolist())
      logps.append(lps[j, :lens[j]])
      finished.append(bool(done[j]))
  texts = [tok.decode(r[:-1] if f and r else r) for r, f in zip(responses, finished)]
  perm = np.stack(perm_rows)
  slate_rows = np.repeat(slates["slate"], group_size, axis=0)
  shown_sids = [[sids[int(slate_rows[i, j])] for j in perm[i]] for i in range(n)]
  omega, order, reasons = parser.parse_batch(texts, shown_sids)
  target = np.repeat(slates["target_index"], group_size)
  inv = np.argsort(perm, axis=-1)  # legacy position -> shown position
  grades = np.take_along_axis(np.repeat(slates["grades"], group_size, axis=0), perm, axis=-1)
  return Rollouts(prompts=prompt_ids, responses=responses, logps=logps, texts=texts,
                  lengths=np.asarray([len(r) for r in responses], np.int32),
                  finished=np.asarray(finished, bool), perm=perm,
                  target_index=inv[np.arange(n), target], grades=grades,
                  omega=np.asarray(omega, bool), order=np.asarray(order), reasons=list(reasons),
                  group_size=group_size)


def legacy_order(ro: Rollouts):
  """int [N, K]: the output order in legacy slate positions (the shown order undone)."""
  return np.take_along_axis(ro.perm, ro.order, axis=-1)


def score(ro: Rollouts, reward: str, **reward_kwargs):
  """{component: float32 [N]} of the registered reward (its `total` included)."""
  fn = REWARDS.get(reward)
  out = fn(ro.omega, ro.order, target_index=ro.target_index, grades=ro.grades, **reward_kwargs)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}
