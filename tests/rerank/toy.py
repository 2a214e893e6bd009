"""A toy re-ranking example and a tiny model that memorised one answer to it (SIDs), and the
same in the "positions" answer format on a slate of 12 (numbers of two digits)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.sids import tokens as sid_lib
from gr2_jax.teachers import base
from gr2_jax.text import chat
from gr2_jax.text import prompts
from gr2_jax.text import tokenizers
from gr2_jax.train import packing

ITEMS = [{"id": i, "title": t, "year": 1990 + i, "genres": ["Drama"]}
         for i, t in enumerate(("Alpha", "Bravo", "Charlie", "Delta"))]
SIDS = [sid_lib.sid_tokens((i, 0)) for i in range(4)]
PROMPT = prompts.PromptConfig(max_history=2, include_user=False)
EXAMPLE = base.TeacherExample(history=(0,), slate=(1, 2, 3), target=2)
# Lists slate item 1 twice and omits 3: invalid (duplicate) unless the constraint steps in.
ANSWER = prompts.render_answer([SIDS[1], SIDS[1], SIDS[2]], f"see {SIDS[1]}")

POSITIONS_PROMPT = prompts.PromptConfig(max_history=2, include_user=False,
                                        answer_format="positions")
POSITIONS_EXAMPLE = base.TeacherExample(history=(0,), slate=(1, 2, 3) * 4, target=2)
# Lists 10 twice and omits 12: invalid (duplicate) unless the constraint steps in.
POSITIONS_ANSWER = prompts.render_answer([10, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11],
                                         f"see {SIDS[1]}")


def messages(answer=None, prompt=PROMPT, example=EXAMPLE):
  return prompts.build_messages(prompts.with_sids(example.history, ITEMS, SIDS),
                                prompts.with_sids(example.slate, ITEMS, SIDS), prompt,
                                answer=answer)


def memorise(folder, answer=ANSWER, prompt=PROMPT, example=EXAMPLE):
  """(model, tokenizer) of a tiny Qwen3 trained to answer `example` with `answer`."""
  return memorise_chat(folder, messages(answer, prompt, example))


def memorise_chat(folder, msgs):
  """(model, tokenizer) of a tiny Qwen3 trained to answer the chat `msgs` (its last message the
  assistant's answer) with that answer."""
  corpus = [chat.render_chat(msgs)] * 20 + [it["title"] for it in ITEMS]
  tok = tokenizers.train_sentencepiece(corpus, folder, 400,
                                       user_defined_symbols=sid_lib.all_sid_tokens(2, 4))
  cfg = qwen3.get_model_config("tiny", vocab_size=-(-tok.vocab_size // 128) * 128)
  model = mesh_lib.create_sharded_model(cfg, mesh_lib.single_device_mesh(), seed=0)
  ids, mask = chat.render_for_training(msgs, tok)
  rows = packing.pack([(ids, mask.astype(np.float32))], len(ids) + 1, tok.pad_id)
  batch = {k: jnp.asarray(rows[k]) for k in ("tokens", "positions", "segment_ids", "targets",
                                             "weights")}
  graphdef, state = nnx.split(model)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(state, opt):
    def loss(s):
      logits, _ = qwen3.apply(graphdef, s, batch["tokens"], batch["positions"],
                              segment_ids=batch["segment_ids"])
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None],
                                 -1)[..., 0]
      return (nll * batch["weights"]).sum() / batch["weights"].sum()
    g = jax.grad(loss)(state)
    upd, opt = tx.update(g, opt, state)
    return optax.apply_updates(state, upd), opt

  opt = tx.init(state)
  for _ in range(80):
    state, opt = step(state, opt)
  return nnx.merge(graphdef, state), tok
