"""Qwen3 / ChatML chat layout: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

The ids are built piece by piece (control tokens by id, `{role}\\n`, content, `\\n` each encoded
on its own) so that training and generation tokenise a conversation identically and the
assistant content boundary is exact in the loss mask. With Qwen3's tokenizer these pieces are
exactly the pre-tokenizer's splits, so the ids equal those of encoding the rendered string.
"""

from typing import Sequence

import numpy as np

from gr2_jax.errors import UserError
from gr2_jax.text.tokenizers import IM_END, IM_START, Tokenizer

ROLES = ("system", "user", "assistant")


def _check(messages):
  if not isinstance(messages, (list, tuple)):
    raise UserError(f"a conversation must be a list of messages, got {type(messages).__name__}")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise UserError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
    if m["role"] not in ROLES:
      raise UserError(f"message {i} has role {m['role']!r}; valid roles: {', '.join(ROLES)}")
    if not isinstance(m["content"], str):
      raise UserError(f"message {i} content must be a string, got {type(m['content']).__name__}")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
  """The conversation as text; `add_generation_prompt` opens an assistant turn at the end."""
  _check(messages)
  text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
  if add_generation_prompt:
    text += f"{IM_START}assistant\n"
  return text


def render_for_training(messages: Sequence[dict], tokenizer: Tokenizer):
  """Ids of the conversation and its loss mask, both int32 [T].

  The mask is 1 exactly on the assistant turns' content tokens and their `<|im_end|>` (the
  model learns to stop), 0 on everything else, the `<|im_start|>assistant\\n` header included.
  """
  ids, mask, _ = render_with_starts(messages, tokenizer)
  return ids, mask


def render_with_starts(messages: Sequence[dict], tokenizer: Tokenizer):
  """`render_for_training`'s ids and mask, and where each message's content starts in the ids
  (a list of ints): message m's content tokens are `tokenizer.encode(content)` from there."""
  _check(messages)
  newline = tokenizer.encode("\n")
  ids, mask, starts = [], [], []
  for m in messages:
    header = [tokenizer.im_start_id] + tokenizer.encode(m["role"] + "\n")
    body = tokenizer.encode(m["content"]) + [tokenizer.im_end_id]
    learn = int(m["role"] == "assistant")
    starts.append(len(ids) + len(header))
    ids += header + body + newline
    mask += [0] * len(header) + [learn] * len(body) + [0] * len(newline)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32), starts


def encode_chat(messages: Sequence[dict], tokenizer: Tokenizer,
                add_generation_prompt: bool = False) -> list[int]:
  """Ids of the conversation (as `render_for_training`), for prompting a model."""
  ids, _ = render_for_training(messages, tokenizer)
  ids = ids.tolist()
  if add_generation_prompt:
    ids += [tokenizer.im_start_id] + tokenizer.encode("assistant\n")
  return ids


def chat_stop_ids(tokenizer: Tokenizer) -> tuple:
  """Ids that end a generated assistant turn."""
  return (tokenizer.im_end_id, tokenizer.eos_id)
