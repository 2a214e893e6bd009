"""A gr2_jax checkpoint as teacher: answers sampled on device with the sampler.

A larger checkpoint (an sft or midtrain artifact of this project) writes traces for a smaller
student. With the target visible, the teacher's user turn gains one line naming the target and
asking to put it first; the training conversation keeps the plain prompt (`base.conversation`).
"""

import jax
import numpy as np

from gr2_jax.sampling import sampler
from gr2_jax.teachers import base
from gr2_jax.text import chat
from gr2_jax.text import parser
from gr2_jax.text import prompts


class CheckpointTeacher(base.Teacher):
  """Samples re-ranking answers from a Qwen3 checkpoint."""

  def __init__(self, model, tok, items, sids, prompt_cfg, *, temperature=1.0, top_p=1.0,
               max_new_tokens=448):
    self.model = model
    self.tok = tok
    self.items = items
    self.sids = sids
    self.prompt_cfg = prompt_cfg
    self.temperature = float(temperature)
    self.top_p = float(top_p)
    self.max_new_tokens = int(max_new_tokens)

  def messages(self, example, target_visible):
    """The teacher's prompt: the re-ranking prompt, plus the target hint when visible."""
    msgs = prompts.build_messages(prompts.with_sids(example.history, self.items, self.sids),
                                  prompts.with_sids(example.slate, self.items, self.sids,
                                                    example.evidence),
                                  self.prompt_cfg, user=example.user)
    if target_visible:
      sid = self.sids[int(example.target)]
      first = prompts.first_number(self.prompt_cfg.answer_format)
      if first is not None:
        sid = f"candidate {list(example.slate).index(example.target) + first} ({sid})"
      msgs[1] = dict(msgs[1], content=msgs[1]["content"] + (
          f"\nThe user watched {sid} next: rank it first and explain why it fits."))
    return msgs

  def sample(self, example, *, target_visible, rng, num_samples=1):
    rng = np.random.default_rng(rng)
    ids = chat.encode_chat(self.messages(example, target_visible), self.tok,
                           add_generation_prompt=True)
    key = jax.random.key(int(rng.integers(2 ** 31)))
    out = sampler.sample(self.model, [ids] * num_samples, key=key,
                         max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                         top_p=self.top_p, stop_tokens=chat.chat_stop_ids(self.tok),
                         pad_id=self.tok.pad_id, prompt_multiple=64)
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    stops = set(chat.chat_stop_ids(self.tok))
    slate_sids = [self.sids[int(x)] for x in example.slate]
    outs = []
    for j in range(num_samples):
      gen = toks[j, :lens[j]].tolist()
      if gen and gen[-1] in stops:
        gen = gen[:-1]
      text = self.tok.decode(gen)
      parsed = parser.parse_ranking(text, slate_sids, self.prompt_cfg.answer_format)
      outs.append(base.TeacherOutput(text=text, order=parsed.order or (), meta={
          "omega": parsed.omega, "reason": parsed.reason, "targeted": bool(target_visible),
          "temperature": self.temperature, "tokens": len(gen)}))
    return outs
