"""The teacher interface: a teacher ranks a slate and writes the assistant's JSON answer."""

import abc
import dataclasses
from typing import Optional, Sequence

import numpy as np

from gr2_jax.text import prompts


@dataclasses.dataclass(frozen=True)
class TeacherExample:
  """One re-ranking example as item ids: history chronological, slate in legacy order."""
  history: Sequence[int]
  slate: Sequence[int]
  target: Optional[int] = None  # read only when the target is visible
  user: Optional[dict] = None  # user features (age, gender, occupation)
  # {candidate item id: text} shown with the "evidence" item field (`teachers.evidence`).
  evidence: Optional[dict] = None
  # The context compressor's summary, shown in place of the history (`gr2_jax.compress`).
  summary: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class TeacherOutput:
  text: str  # the assistant's JSON answer
  order: tuple  # slate positions in output order
  meta: dict


class Teacher(abc.ABC):
  """Writes ranked, explained answers for re-ranking examples."""

  @abc.abstractmethod
  def sample(self, example: TeacherExample, *, target_visible: bool, rng,
             num_samples: int = 1) -> list:
    """`num_samples` TeacherOutputs; `target_visible` puts the target first and explains it.

    rng: a numpy Generator or an int seed.
    """


def examples_from_slates(slates, users=None, evidence=None, summaries=None):
  """TeacherExamples of stacked slate records (`gr2_jax.data.slates.load_split`; -1 pads the
  history on the left). users: the users artifact list, indexed by user id. evidence: a
  `teachers.evidence.SlateEvidence` (or None) that annotates each slate's candidates.
  summaries: one text per slate shown in place of its history (or None)."""
  out = []
  for i in range(len(slates["slate"])):
    h = slates["history"][i]
    user = users[int(slates["user"][i])] if users is not None and "user" in slates else None
    history = tuple(int(x) for x in h[h >= 0])
    slate = tuple(int(x) for x in slates["slate"][i])
    out.append(TeacherExample(history=history, slate=slate, target=int(slates["target"][i]),
                              user=user,
                              evidence=None if evidence is None else evidence(history, slate),
                              summary=None if summaries is None else summaries[i]))
  return out


def conversation(example: TeacherExample, output: TeacherOutput, items, sids,
                 prompt_cfg: prompts.PromptConfig):
  """The training conversation: the prompt of `example` and the teacher's answer."""
  return prompts.build_messages(prompts.with_sids(example.history, items, sids),
                                prompts.with_sids(example.slate, items, sids, example.evidence),
                                prompt_cfg, user=example.user, answer=output.text)


def rejection_sample(teacher: Teacher, example: TeacherExample, rng, max_tries=8):
  """Samples with the target hidden until the top choice is the target; None after max_tries."""
  rng = np.random.default_rng(rng)
  target_pos = list(example.slate).index(example.target)
  for tries in range(1, max_tries + 1):
    out = teacher.sample(example, target_visible=False, rng=rng)[0]
    if out.order[0] == target_pos:
      return dataclasses.replace(out, meta=dict(out.meta, tries=tries))
  return None
