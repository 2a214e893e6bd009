"""Decoding constraints: pure objects whose state rides in the sampler's loop.

A constraint has `init(batch) -> state`, `allowed(state) -> bool [B, V]` and
`update(state, tokens [B]) -> state`, all jittable; the constraint itself is a pytree (its arrays
are traced, its settings static), so one compiled sampler serves every constraint of the same
shapes.

`TrieConstraint` allows only continuations of a set of token sequences (for example every
valid semantic ID of a catalogue). The trie is stored as padded child tables: node n's children
are `child_tokens[n, :]` / `child_nodes[n, :]` (-1 = none), so a step is a gather and a scatter,
not a [nodes, V] table. Leaves are numbered in depth-first order, so the leaves below a node are
the contiguous range `leaf_lo[n] .. leaf_hi[n]`; with a per-row `remaining [B, L]` mask of
leaves still allowed, a child is allowed iff a prefix sum says its range holds a remaining leaf.
That gives the slate constraint (each item of a row's slate at most once) with the same code.
Leaves may form groups (`leaf_group`): emitting one leaf uses up every leaf of its group, so an
item written in several ways (a number with a comma or a bracket after it) is listed once. A
leaf's `leaf_rule` can also tie it to how many groups are left: LAST (only as the last group
left, e.g. the number that closes a list) or NOT_LAST (only while another group is left).

Node 0 is FREE (any token; only used with a `trigger`), node 1 the trie's root. With a trigger
(e.g. `<|sid_begin|>`) generation is free until the trigger, then must follow the trie, then is
free again after a leaf. Without one, generation starts at the root and returns to it after each
leaf; `root_tokens` (stop or separator tokens) are also allowed at the root.

`NoRepeatNGram` bans a token that would repeat an n-gram of the row's own generated tokens.
"""

from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gr2_jax.errors import UserError

FREE, ROOT = 0, 1
ANY, LAST, NOT_LAST = 0, 1, 2  # leaf rules


class Constraint:
  """Interface of a decoding constraint (see the module docstring)."""

  def init(self, batch: int):
    raise NotImplementedError

  def allowed(self, state) -> jax.Array:
    raise NotImplementedError

  def update(self, state, tokens: jax.Array):
    raise NotImplementedError


@flax.struct.dataclass
class TrieConstraint(Constraint):
  """Only continuations of the trie's sequences (see the module docstring)."""
  child_tokens: jax.Array  # int32 [N, F], -1 = no child
  child_nodes: jax.Array  # int32 [N, F]
  leaf_lo: jax.Array  # int32 [N]
  leaf_hi: jax.Array  # int32 [N]
  leaf_id: jax.Array  # int32 [N], -1 for inner nodes
  leaf_group: jax.Array  # int32 [L], leaves of one group are used up together
  leaf_rule: jax.Array  # int32 [L]: ANY, LAST or NOT_LAST
  root_tokens: jax.Array  # int32 [R], allowed at the root (state stays at the root)
  initial_remaining: jax.Array  # bool [1 or B, L]
  vocab_size: int = flax.struct.field(pytree_node=False)
  trigger: int = flax.struct.field(pytree_node=False, default=-1)
  consume: bool = flax.struct.field(pytree_node=False, default=False)
  ruled: bool = flax.struct.field(pytree_node=False, default=False)  # any leaf_rule not ANY

  @property
  def num_leaves(self):
    return self.initial_remaining.shape[1]

  def init(self, batch):
    rows = self.initial_remaining.shape[0]
    if rows not in (1, batch):
      raise UserError(f"the constraint was built for {rows} rows but the batch has {batch}")
    start = FREE if self.trigger >= 0 else ROOT
    return {"node": jnp.full((batch,), start, jnp.int32),
            "remaining": jnp.broadcast_to(self.initial_remaining, (batch, self.num_leaves))}

  def allowed(self, state):
    node, remaining = state["node"], state["remaining"]
    b, v = node.shape[0], self.vocab_size
    tokens = self.child_tokens[node]  # [B, F]
    children = jnp.maximum(self.child_nodes[node], 0)
    if self.ruled:
      groups_left = jnp.zeros(remaining.shape, jnp.int32).at[:, self.leaf_group].max(
          remaining.astype(jnp.int32)).sum(axis=1, keepdims=True)  # [B, 1]
      remaining = remaining & jnp.where(
          self.leaf_rule == LAST, groups_left == 1,
          jnp.where(self.leaf_rule == NOT_LAST, groups_left > 1, True))
    csum = jnp.concatenate(
        [jnp.zeros((b, 1), jnp.int32), jnp.cumsum(remaining.astype(jnp.int32), axis=1)], axis=1)
    rows = jnp.arange(b)[:, None]
    live = csum[rows, self.leaf_hi[children]] - csum[rows, self.leaf_lo[children]] > 0
    ok = (tokens >= 0) & live
    # Out-of-range index v marks "no token" and is dropped by the scatter.
    mask = jnp.zeros((b, v), bool).at[rows, jnp.where(ok, tokens, v)].set(True, mode="drop")
    at_root = (node == ROOT)[:, None]
    mask = mask.at[:, self.root_tokens].set(at_root | mask[:, self.root_tokens])
    if self.trigger >= 0:
      free = (node == FREE)[:, None]
      mask = jnp.where(free, True, mask)
      any_left = jnp.any(remaining, axis=1)
      mask = mask.at[:, self.trigger].set(jnp.where(free[:, 0], any_left, mask[:, self.trigger]))
    return mask

  def update(self, state, tokens):
    node, remaining = state["node"], state["remaining"]
    hit = self.child_tokens[node] == tokens[:, None]  # [B, F]
    child = jnp.max(jnp.where(hit, self.child_nodes[node], -1), axis=1)
    after_leaf = FREE if self.trigger >= 0 else ROOT
    leaf = jnp.where(child >= 0, self.leaf_id[jnp.maximum(child, 0)], -1)
    if self.trigger >= 0:
      # In FREE only the trigger enters the trie; any other token stays free.
      stay = jnp.where(tokens == self.trigger, ROOT, FREE)
      new = jnp.where(node == FREE, stay, child)
    else:
      new = child
    new = jnp.where(leaf >= 0, after_leaf, new)
    # A token outside the trie (only possible if the caller ignored `allowed`, or a root
    # token) leaves the row where it was.
    new = jnp.where(new < 0, node, new)
    if self.consume:
      group = jnp.where(leaf >= 0, self.leaf_group[jnp.maximum(leaf, 0)], -1)  # [B]
      remaining = remaining & (self.leaf_group[None, :] != group[:, None])
    return {"node": new.astype(jnp.int32), "remaining": remaining}


@flax.struct.dataclass
class NoRepeatNGram(Constraint):
  """Bans every token that would complete an n-gram the row has already generated (the
  generated tokens only, not the prompt): the guard against greedy decoding's loops.

  State: the row's generated tokens (`max_len` tracked; tokens past it are not remembered) and
  their count. At each step the last n - 1 tokens are compared with every earlier window of
  n - 1 generated tokens; the token that followed a matching window is not allowed.
  """
  vocab_size: int = flax.struct.field(pytree_node=False)
  n: int = flax.struct.field(pytree_node=False)
  max_len: int = flax.struct.field(pytree_node=False)

  def init(self, batch):
    return {"tokens": jnp.zeros((batch, self.max_len), jnp.int32),
            "count": jnp.zeros((batch,), jnp.int32)}

  def allowed(self, state):
    toks, count = state["tokens"], jnp.minimum(state["count"], self.max_len)
    b, length = toks.shape
    m = self.n - 1
    rows = jnp.arange(b)[:, None]
    offs = jnp.arange(m)
    suffix = toks[rows, jnp.clip(count[:, None] - m + offs[None, :], 0, length - 1)]  # [B, m]
    starts = jnp.arange(length)
    windows = toks[:, jnp.clip(starts[:, None] + offs[None, :], 0, length - 1)]  # [B, L, m]
    # Window i is followed by token i + m, which must already be generated (i + m < count).
    match = (jnp.all(windows == suffix[:, None, :], axis=-1)
             & (starts[None, :] + m < count[:, None]))
    banned = toks[:, jnp.clip(starts + m, 0, length - 1)]  # [B, L]
    # Past max_len the suffix is no longer known: everything is allowed.
    match = match & (state["count"] <= self.max_len)[:, None]
    v = self.vocab_size
    return jnp.ones((b, v), bool).at[rows, jnp.where(match, banned, v)].set(False, mode="drop")

  def update(self, state, tokens):
    toks, count = state["tokens"], state["count"]
    rows = jnp.arange(toks.shape[0])
    slot = jnp.where(count < self.max_len, count, self.max_len)  # past the end: dropped
    return {"tokens": toks.at[rows, slot].set(tokens.astype(jnp.int32), mode="drop"),
            "count": count + 1}


def no_repeat_ngram(n: int, vocab_size: int, max_len: int) -> NoRepeatNGram:
  """A `NoRepeatNGram` for n-grams of `n` >= 1 tokens over the first `max_len` generated."""
  if int(n) < 1:
    raise UserError(f"the no-repeat n-gram size must be >= 1, got {n}")
  if int(max_len) < 1:
    raise UserError(f"the no-repeat constraint must track >= 1 token, got max_len={max_len}")
  return NoRepeatNGram(vocab_size=int(vocab_size), n=int(n), max_len=int(max_len))


def _build_tables(sequences, vocab_size):
  """Padded child tables and DFS leaf numbering of the trie of `sequences`."""
  children = [{}, {}]  # node -> {token: child}; node 0 FREE, node 1 ROOT
  terminal = {}
  for s in sequences:
    s = [int(t) for t in s]
    if not s:
      raise UserError("a constraint sequence is empty; every allowed sequence needs a token")
    for t in s:
      if not 0 <= t < vocab_size:
        raise UserError(f"constraint token {t} is outside the vocabulary of {vocab_size}")
    node = ROOT
    for i, t in enumerate(s):
      if node in terminal:
        raise UserError(f"constraint sequence {s} extends another allowed sequence; the "
                        "sequences must be prefix-free (end each with a closing token)")
      if t not in children[node]:
        children.append({})
        children[node][t] = len(children) - 1
      node = children[node][t]
    if children[node]:
      raise UserError(f"constraint sequence {s} is a prefix of another allowed sequence; the "
                      "sequences must be prefix-free (end each with a closing token)")
    terminal.setdefault(node, tuple(s))
  n = len(children)
  fanout = max(1, max(len(c) for c in children))
  child_tokens = np.full((n, fanout), -1, np.int32)
  child_nodes = np.full((n, fanout), -1, np.int32)
  for i, c in enumerate(children):
    for j, (t, ch) in enumerate(sorted(c.items())):
      child_tokens[i, j], child_nodes[i, j] = t, ch
  leaf_lo = np.zeros(n, np.int32)
  leaf_hi = np.zeros(n, np.int32)
  leaf_id = np.full(n, -1, np.int32)
  leaf_seqs = []
  # Iterative DFS (tries of long sequences would overflow Python's recursion limit).
  stack = [(ROOT, False)]
  while stack:
    node, closing = stack.pop()
    if closing:
      leaf_hi[node] = len(leaf_seqs)
      continue
    leaf_lo[node] = len(leaf_seqs)
    if node in terminal:
      leaf_id[node] = len(leaf_seqs)
      leaf_seqs.append(terminal[node])
    stack.append((node, True))
    for _, ch in sorted(children[node].items(), reverse=True):
      stack.append((ch, False))
  return dict(child_tokens=child_tokens, child_nodes=child_nodes, leaf_lo=leaf_lo,
              leaf_hi=leaf_hi, leaf_id=leaf_id), leaf_seqs


def _pad_tables(tables, nodes, fanout):
  """Tables grown to `nodes` rows and `fanout` children with unreachable entries."""
  n, f = tables["child_tokens"].shape
  nodes, fanout = max(nodes, n), max(fanout, f)
  out = {}
  for k in ("child_tokens", "child_nodes"):
    out[k] = np.full((nodes, fanout), -1, np.int32)
    out[k][:n, :f] = tables[k]
  for k, fill in (("leaf_lo", 0), ("leaf_hi", 0), ("leaf_id", -1)):
    out[k] = np.full(nodes, fill, np.int32)
    out[k][:n] = tables[k]
  return out


def trie_constraint(sequences: Sequence[Sequence[int]], vocab_size: int, *,
                    trigger: Optional[int] = None,
                    root_tokens: Sequence[int] = ()) -> TrieConstraint:
  """Allows only the given (prefix-free) token sequences, any number of times."""
  tables, leaves = _build_tables(sequences, vocab_size)
  return TrieConstraint(
      **{k: jnp.asarray(v) for k, v in tables.items()},
      leaf_group=jnp.arange(len(leaves), dtype=jnp.int32),
      leaf_rule=jnp.zeros(len(leaves), jnp.int32),
      root_tokens=jnp.asarray(list(root_tokens), jnp.int32).reshape(-1),
      initial_remaining=jnp.ones((1, len(leaves)), bool),
      vocab_size=int(vocab_size), trigger=-1 if trigger is None else int(trigger),
      consume=False)


def slate_constraint(slates: Sequence[Sequence[Sequence[int]]], vocab_size: int, *,
                     trigger: Optional[int] = None,
                     root_tokens: Sequence[int] = ()) -> TrieConstraint:
  """Row b may emit each sequence of `slates[b]` once, and nothing else inside the trie.

  The tables are padded to sizes that depend only on the slates' shapes (rows, items, tokens
  per item), not on which items they hold, so one compiled sampler serves every batch.
  """
  union = sorted({tuple(int(t) for t in s) for slate in slates for s in slate})
  tables, leaves = _build_tables(union, vocab_size)
  items = sum(len(slate) for slate in slates)
  tables = _pad_tables(tables, nodes=2 + sum(len(s) for slate in slates for s in slate),
                       fanout=max(items, 1))
  index = {s: i for i, s in enumerate(leaves)}
  remaining = np.zeros((len(slates), max(items, len(leaves))), bool)  # padded leaves: never
  for b, slate in enumerate(slates):
    for s in slate:
      remaining[b, index[tuple(int(t) for t in s)]] = True
  return TrieConstraint(
      **{k: jnp.asarray(v) for k, v in tables.items()},
      leaf_group=jnp.arange(remaining.shape[1], dtype=jnp.int32),
      leaf_rule=jnp.zeros(remaining.shape[1], jnp.int32),
      root_tokens=jnp.asarray(list(root_tokens), jnp.int32).reshape(-1),
      initial_remaining=jnp.asarray(remaining),
      vocab_size=int(vocab_size), trigger=-1 if trigger is None else int(trigger),
      consume=True)


def group_constraint(groups: Sequence[Sequence[Sequence[int]]], vocab_size: int, *,
                     closing: Optional[Sequence[Sequence[Sequence[int]]]] = None,
                     root_tokens: Sequence[int] = ()) -> TrieConstraint:
  """Each group may be emitted once, as any one of its token sequences; the same for every row.

  groups[i] holds the ways of writing item i (all sequences together prefix-free). With
  `closing`, closing[i] holds the ways of writing item i as the last one left (a number with
  the list's closing bracket), and those of groups[i] are allowed only while another item is
  left. Generation starts at the root, where `root_tokens` are also allowed, and returns to it
  after each item.
  """
  owner = {}
  rule = {}
  for ways, kind in ((groups, ANY if closing is None else NOT_LAST), (closing or (), LAST)):
    for g, seqs in enumerate(ways):
      for s in seqs:
        s = tuple(int(t) for t in s)
        if owner.setdefault(s, g) != g or rule.setdefault(s, kind) != kind:
          raise UserError(f"constraint sequence {list(s)} is listed twice")
  tables, leaves = _build_tables(sorted(owner), vocab_size)
  return TrieConstraint(
      **{k: jnp.asarray(v) for k, v in tables.items()},
      leaf_group=jnp.asarray([owner[s] for s in leaves], jnp.int32),
      leaf_rule=jnp.asarray([rule[s] for s in leaves], jnp.int32),
      root_tokens=jnp.asarray(list(root_tokens), jnp.int32).reshape(-1),
      initial_remaining=jnp.ones((1, len(leaves)), bool),
      vocab_size=int(vocab_size), trigger=-1, consume=True, ruled=closing is not None)


def list_constraint(rows: Sequence[Sequence[tuple]], vocab_size: int) -> TrieConstraint:
  """Row b writes each of its items exactly once and then nothing else: a whole list.

  rows[b] holds one (key, going_on, closing) per item: the item's key (items with the same key
  are one group, in every row) and its ways of being written while another item is left
  (`going_on`, e.g. the item with the comma after it) and as the last one (`closing`, e.g. with
  the list's closing bracket and the stop token). After the closing way no token is allowed, so
  the closing ways should end with a stop token. Tables are padded to sizes that depend only on
  the rows' shapes, as in `slate_constraint`.
  """
  owner, rule, keys = {}, {}, {}
  for row in rows:
    for key, going_on, closing in row:
      g = keys.setdefault(key, len(keys))
      for ways, kind in ((going_on, NOT_LAST), (closing, LAST)):
        for s in ways:
          s = tuple(int(t) for t in s)
          if owner.setdefault(s, g) != g or rule.setdefault(s, kind) != kind:
            raise UserError(f"list constraint: token sequence {list(s)} writes two different "
                            "items or positions")
  tables, leaves = _build_tables(sorted(owner), vocab_size)
  n_seqs = sum(len(w) for row in rows for _, a, b in row for w in (a, b))
  n_tokens = sum(len(s) for row in rows for _, a, b in row for w in (a, b) for s in w)
  tables = _pad_tables(tables, nodes=2 + n_tokens, fanout=max(n_seqs, 1))
  width = max(n_seqs, len(leaves))
  remaining = np.zeros((len(rows), width), bool)
  group = np.full(width, len(keys), np.int32)  # padded leaves: a group of their own, never left
  ruleset = np.zeros(width, np.int32)
  for i, s in enumerate(leaves):
    group[i], ruleset[i] = owner[s], rule[s]
  for b, row in enumerate(rows):
    mine = {keys[key] for key, _, _ in row}
    remaining[b, :len(leaves)] = np.isin(group[:len(leaves)], list(mine))
  return TrieConstraint(
      **{k: jnp.asarray(v) for k, v in tables.items()},
      leaf_group=jnp.asarray(group), leaf_rule=jnp.asarray(ruleset),
      root_tokens=jnp.zeros((0,), jnp.int32), initial_remaining=jnp.asarray(remaining),
      vocab_size=int(vocab_size), trigger=-1, consume=True, ruled=True)
