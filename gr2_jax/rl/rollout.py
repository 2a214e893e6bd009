"""Rollouts for RL: G sampled answers per re-ranking prompt on the on-device sampler, parsed
with Omega and scored by a registered reward.

Each of the G samples of a prompt may see its own shuffle of the slate (`shuffle=True`, the
default against position bias). The answer is parsed in the positions it was shown, then mapped
back to legacy positions for the reward, whose labels (the target's legacy rank, the grades)
stay those of the legacy order: two samples that rank the items alike get the same reward,
whatever they were shown. With `shuffle=False` every sample sees the legacy order.

With `constrain_ranking=True` an answer is sampled in two passes, as the constrained evaluation
decodes: the free sample up to its `"recommendations"` key is kept, and from there each SID must
be one of the shown slate's items not listed yet (`constraints.slate_constraint`), or each
number one of 1..K not listed yet in the "positions" answer format; punctuation and the closing
stay free, so Omega can still fail (a short list, broken JSON). A sample without the key keeps
its free text (invalid). A prompt with `answer_head` (the reasoning bypassed: the assistant turn
opens with `{"recommendations": [`) samples the list alone, in one pass under the strict list
constraint (each shown item once, then the closing and the stop token) when constrained. Log-probabilities are the policy's at the sampling temperature over the
whole vocabulary, before the constraint's mask (see `gr2_jax.sampling.sampler`), so the update
raises or lowers the policy's own probability of the entries it was steered to; entropies are
those of the distributions actually sampled from.
"""

import dataclasses

import jax
import numpy as np

from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.rl.registry import REWARDS
from gr2_jax.teachers import base
from gr2_jax.text import parser


@dataclasses.dataclass
class Rollouts:
  """N = P * G rollouts, row p * G + g being sample g of prompt p."""
  prompts: list  # prompt ids per rollout
  responses: list  # response ids (stop token included when emitted)
  logps: list  # rollout log-probs of the response tokens (at the sampling temperature)
  entropies: list  # entropy of each token's sampled distribution (mask and temperature applied)
  texts: list  # decoded answers (stop token dropped)
  lengths: np.ndarray  # int32 [N] response tokens
  finished: np.ndarray  # bool [N] stopped by a stop token (not truncated)
  perm: np.ndarray  # int [N, K]: shown position j holds legacy slate position perm[j]
  target_index: np.ndarray  # int [N] target's legacy position (-1: not in the slate)
  grades: np.ndarray  # int [N, K] graded labels by legacy position
  omega: np.ndarray  # bool [N]
  order: np.ndarray  # int [N, K] output order in shown positions (identity where invalid)
  reasons: list
  group_size: int


def slate_permutations(num_prompts, group_size, k, shuffle, rng):
  """int [P, G, K]: the slate order each sample is shown (identity when not shuffled)."""
  if not shuffle:
    return np.tile(np.arange(k), (num_prompts, group_size, 1))
  return np.argsort(rng.random((num_prompts, group_size, k)), axis=-1)


def _sample(model, tok, prompt_ids, *, key, batch_size, max_new_tokens, temperature,
            make_constraint=None, jump_forward=0):
  """(responses, logps, finished, entropies) of one sampled answer per prompt."""
  return rerank_lib.generate(model, tok, prompt_ids, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, make_constraint=make_constraint,
                             greedy=False, temperature=temperature, key=key,
                             jump_forward=jump_forward)


def _constrained_tails(model, tok, prompt_ids, sampled, shown_sids, answer_format, *, key,
                       batch_size, max_new_tokens, temperature, jump_forward=0):
  """Resamples each answer's ranking under the slate constraint (see the module docstring)."""
  responses, logps, finished, entropies = (list(x) for x in sampled)
  heads, rows = [], []
  for i, r in enumerate(responses):
    cut = rerank_lib.ranking_cut(tok, r[:-1] if finished[i] else r)
    if cut is not None and cut < max_new_tokens:
      heads.append(r[:cut])
      rows.append(i)
  if not rows:
    return responses, logps, finished, entropies
  make_constraint, budget = rerank_lib.ranking_constraint(
      tok, model.cfg.vocab_size, [shown_sids[i] for i in rows], answer_format, batch_size)
  # A fixed budget (the ranking's entries with their separators, and the closing) keeps one
  # compiled decode loop; the answer's overall budget is enforced below.
  budget = min(max_new_tokens, budget)
  tails, tail_lps, tail_done, tail_ents = _sample(
      model, tok, [prompt_ids[i] + h for i, h in zip(rows, heads)], key=key,
      batch_size=batch_size, max_new_tokens=budget, temperature=temperature,
      make_constraint=make_constraint, jump_forward=jump_forward)
  for j, i in enumerate(rows):
    room = max_new_tokens - len(heads[j])  # the answer keeps its overall token budget
    tail = tails[j][:room]
    responses[i] = heads[j] + tail
    logps[i] = np.concatenate([logps[i][:len(heads[j])], tail_lps[j][:room]])
    entropies[i] = np.concatenate([entropies[i][:len(heads[j])], tail_ents[j][:room]])
    finished[i] = tail_done[j] and len(tails[j]) <= room
  return responses, logps, finished, entropies


def rollout(model, tok, slates, items, sids, prompt_cfg, users=None, *, group_size, shuffle,
            key, rng, max_new_tokens, temperature=1.0, batch_size=64, constrain_ranking=False,
            evidence=None, summaries=None, jump_forward=0):
  """Samples `group_size` answers for each slate of the stacked records `slates` (`evidence`:
  the `teachers.evidence.SlateEvidence` of a prompt that shows the "evidence" field;
  `summaries`: one context-compressor text per slate, shown in place of its history;
  `jump_forward`: the constrained passes feed the tokens the constraint forces in chunks of up
  to this many, `sampling.sampler`; the same distribution, another random stream)."""
  examples = base.examples_from_slates(slates, users, evidence, summaries)
  p, k = slates["slate"].shape
  perms = slate_permutations(p, group_size, k, shuffle, rng)
  shown, perm_rows = [], []
  for i, ex in enumerate(examples):
    for g in range(group_size):
      perm = perms[i, g]
      shown.append(dataclasses.replace(ex, slate=tuple(ex.slate[j] for j in perm)))
      perm_rows.append(perm)
  prompt_ids = rerank_lib.prompt_ids(shown, items, sids, prompt_cfg, tok)
  n = len(prompt_ids)
  perm = np.stack(perm_rows)
  slate_rows = np.repeat(slates["slate"], group_size, axis=0)
  shown_sids = [[sids[int(slate_rows[i, j])] for j in perm[i]] for i in range(n)]
  fmt = prompt_cfg.answer_format
  if prompt_cfg.answer_head and constrain_ranking:
    # The prompt ends with the answer's head: the list alone, sampled under the strict list
    # constraint in one pass.
    make_constraint, budget = rerank_lib.list_ranking_constraint(
        tok, model.cfg.vocab_size, shown_sids, fmt, batch_size)
    sampled = _sample(model, tok, prompt_ids, key=key, batch_size=batch_size,
                      max_new_tokens=min(max_new_tokens, budget), temperature=temperature,
                      make_constraint=make_constraint, jump_forward=jump_forward)
  else:
    sampled = _sample(model, tok, prompt_ids, key=key, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, temperature=temperature)
    if constrain_ranking:
      sampled = _constrained_tails(
          model, tok, prompt_ids, sampled, shown_sids, fmt,
          key=jax.random.fold_in(key, 1 << 20), batch_size=batch_size,
          max_new_tokens=max_new_tokens, temperature=temperature, jump_forward=jump_forward)
  responses, logps, finished, entropies = sampled
  lead = ([list(rerank_lib.head_ids(tok, fmt, s[0])) for s in shown_sids]
          if prompt_cfg.answer_head else [[] for _ in shown_sids])
  texts = [tok.decode(h + (r[:-1] if f and r else r))
           for h, r, f in zip(lead, responses, finished)]
  omega, order, reasons, _ = parser.parse_batch(texts, shown_sids, prompt_cfg.answer_format)
  return Rollouts(prompts=prompt_ids, responses=responses, logps=logps, entropies=entropies,
                  texts=texts,
                  lengths=np.asarray([len(r) for r in responses], np.int32),
                  finished=np.asarray(finished, bool), perm=perm,
                  target_index=np.repeat(slates["target_index"], group_size),
                  grades=np.repeat(slates["grades"], group_size, axis=0),
                  omega=np.asarray(omega, bool), order=np.asarray(order), reasons=list(reasons),
                  group_size=group_size)


def legacy_order(ro: Rollouts):
  """int [N, K]: the output order in legacy slate positions (the shown order undone)."""
  return np.take_along_axis(ro.perm, ro.order, axis=-1)


def score(ro: Rollouts, reward: str, **reward_kwargs):
  """{component: float32 [N]} of the registered reward (its `total` included), in legacy
  positions (see the module docstring)."""
  fn = REWARDS.get(reward)
  out = fn(ro.omega, legacy_order(ro), target_index=ro.target_index, grades=ro.grades,
           shown=ro.perm, **reward_kwargs)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}
