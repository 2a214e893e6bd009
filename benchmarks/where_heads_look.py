"""Where a routed SFT model's heads look when it writes its first number, and what it writes.

For test slates rendered as the model's evaluation renders them (legacy display, and a seeded
shuffled display), the answer's head `{"recommendations": [` is appended and one forward pass
gives the first number's logits and the routed layer's KV group 0 attention from that position
(`Qwen3.hidden_and_attention`). Reported: how often the written number is the CF teacher's first
item, how often the candidate line whose end (`sft.route_pointers`' target) gets the most
attention is, how often the two agree, and the first numbers' histogram.

  python benchmarks/where_heads_look.py WORKDIR SFT_ARTIFACT [N=64] [LAYER=-1]
"""

import os
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gr2_jax.data import artifacts
from gr2_jax.data import slates as slates_lib
from gr2_jax.models import artifact
from gr2_jax.rerank import evaluate as rerank_lib
from gr2_jax.stages import sft
from gr2_jax.teachers import base, cf, cf_stats
from gr2_jax.teachers import evidence as evidence_lib
from gr2_jax.text import chat
from gr2_jax.text import prompts

MAX_LEN = 1024


def main(workdir, model_dir, n=64, layer=-1):
  real = lambda s: os.path.realpath(os.path.join(workdir, s, "latest"))
  model, tok = artifact.load_model_and_tokenizer(model_dir)
  layer = model.cfg.num_layers - 1 if layer < 0 else layer
  pcfg, sids = rerank_lib.load_rerank_info(model_dir)
  first = prompts.first_number(pcfg.answer_format)
  items, users = artifacts.load_items(real("data")), artifacts.load_users(real("data"))
  stats = cf_stats.compute_stats(artifacts.load_interactions(real("data")), items,
                                 window=pcfg.evidence_window)
  teacher = cf.CFTeacher(stats, items, [str(i) for i in range(len(items))])
  sl = slates_lib.load_split(real("legacy"), "test", max_examples=300, seed=0)
  sl = {k: v[:n] for k, v in sl.items()}
  k = sl["slate"].shape[1]
  top = teacher.greedy_orders(sl)[:, 0]
  evidence = evidence_lib.for_prompt(pcfg, real("data"))
  numbers = [tok.encode(str(d))[0] for d in range(first, first + k)]
  head = tok.encode(rerank_lib.FORCED_PREFIX)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens, last):
    m = nnx.merge(graphdef, state)
    x, attn = m.hidden_and_attention(tokens, jnp.arange(tokens.shape[1])[None], layer)
    return m.logits(x[:, last][:, None])[0, 0], attn[0, 0, :, last]

  for shuffled in (False, True):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(len(top)):
      perm = rng.permutation(k) if shuffled else np.arange(k)
      one = {key: v[i:i + 1] for key, v in sl.items()}
      one["slate"] = one["slate"][:, perm]
      ex = base.examples_from_slates(one, users, evidence)[0]
      msgs = prompts.build_messages(prompts.with_sids(ex.history, items, sids),
                                    prompts.with_sids(ex.slate, items, sids, ex.evidence), pcfg,
                                    user=ex.user)
      ids, _, starts = chat.render_with_starts(msgs, tok)
      ids = chat.encode_chat(msgs, tok, add_generation_prompt=True) + head
      content = msgs[-1]["content"]
      user_ids = tok.encode(content)
      ends = [starts[-1] + sft._first_token_at(tok, user_ids, c)  # pylint: disable=protected-access
              for c in sft._candidate_line_ends(content, k, first)]  # pylint: disable=protected-access
      tokens = np.zeros((1, MAX_LEN), np.int32)
      tokens[0, :len(ids)] = ids
      logits, attn = forward(state, jnp.asarray(tokens), len(ids) - 1)
      written = int(np.argmax(np.asarray(logits)[numbers]))
      on_line = np.asarray(attn)[:, ends].mean(0)  # mean log attention of the group's heads
      shown_top = int(np.flatnonzero(perm == top[i])[0])
      rows.append((written, int(np.argmax(on_line)), shown_top, float(np.exp(on_line[shown_top]))))
    r = np.asarray(rows)
    print(f"display {'shuffled' if shuffled else 'legacy'}, {len(r)} test slates, layer {layer}: "
          f"first number = teacher's first {np.mean(r[:, 0] == r[:, 2]):.3f}; most-attended line "
          f"= teacher's first {np.mean(r[:, 1] == r[:, 2]):.3f}; first number = most-attended "
          f"line {np.mean(r[:, 0] == r[:, 1]):.3f}; attention on the teacher's line (geometric "
          f"mean over heads, mean over slates) {r[:, 3].mean():.3f}; first numbers "
          f"{np.bincount(r[:, 0].astype(int), minlength=k).tolist()}")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], *[int(a) for a in sys.argv[3:5]])
