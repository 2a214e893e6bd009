"""Pipeline stages: one module each, wired by the graph below.

Each stage module exposes `run(ctx: runner.StageContext) -> dict` (a JSON-able summary). The
graph says which artifacts a stage reads; the runner produces missing ones first.
"""

# stage name -> stages whose artifacts it reads (direct inputs only).
REQUIRES = {
    "data": (),
    "legacy": ("data",),
    "sids": ("data",),
    "rankers": ("data", "legacy", "sids"),
    "eval": ("legacy", "rankers"),
    "midtrain": ("sids", "legacy"),
    "traces": ("data", "legacy", "sids"),
    "sft": ("traces", "midtrain"),
    "rl": ("sft", "rankers"),
    "opd": ("rl", "rankers"),
    "internalize": ("rl", "rankers"),
    "compress": ("rl",),
}

# Stages whose models the runtime (`config.runtime`) builds or loads: its dtypes join their
# fingerprints.
MODEL_STAGES = ("midtrain", "sft", "rl", "opd", "internalize", "eval", "compress")
# Stages every process of a multi-host run takes part in (their arrays span all processes);
# the others run on process 0 while the rest wait.
ALL_PROCESS_STAGES = ("midtrain", "sft", "rl", "opd", "internalize", "compress")

# Bumped when a stage's code changes what its artifact holds, so the fingerprint changes and old
# artifacts are not reused. Stages not listed are at version 1.
VERSIONS = {
    "data": 2,  # histories stop before the target's timestamp
    "legacy": 2,  # SASRec trains on sequences whose same-second ties are shuffled
    "midtrain": 3,  # the slates task
    "traces": 2,  # shorter system turn; traces cite items as the prompt shows them
}


def transitive_requires(stage):
  """All stages `stage` depends on, in an order where inputs come first."""
  if stage not in REQUIRES:
    raise KeyError(stage)
  order = []

  def visit(name):
    for dep in REQUIRES[name]:
      visit(dep)
      if dep not in order:
        order.append(dep)

  visit(stage)
  return order
