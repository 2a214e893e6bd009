"""Text tokenizers behind one interface: a SentencePiece model trained here, or a Hugging Face
`tokenizer.json` (real Qwen3 checkpoints).

Both speak the Qwen3 ChatML control tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`) and
keep every semantic-ID token (`<|sid_begin|>`, `<s_a_57>`, ...) a single id. As in Qwen3 there is
no BOS token and padding uses `<|endoftext|>`.
"""

import abc
import io
import json
import os
from typing import Iterable, Optional, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm
import tokenizers as hf_tokenizers

from gr2_jax.errors import UserError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
CHAT_TOKENS = (IM_START, IM_END)

SP_MODEL_FILE = "spiece.model"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
# Fields of tokenizer_config.json that HFTokenizer keeps (the rest is transformers' business).
HF_CONFIG_KEYS = ("chat_template", "bos_token", "eos_token", "pad_token", "unk_token",
                  "add_bos_token", "add_eos_token")
_UNK = "<unk>"


class Tokenizer(abc.ABC):
  """Text <-> ids, with the chat control tokens as single ids."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Ids of `text`; no BOS/EOS added. Control-token strings in `text` map to their ids."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, control tokens included verbatim."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids (the model's embedding needs at least this many rows)."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> Optional[int]:
    """Id of a vocabulary entry, None when `token` is not one."""

  @abc.abstractmethod
  def id_to_token(self, token_id: int) -> str:
    """Vocabulary entry of an id."""

  @abc.abstractmethod
  def save(self, directory: str) -> str:
    """Writes the tokenizer into `directory`; returns the file written."""

  @classmethod
  @abc.abstractmethod
  def load(cls, directory: str) -> "Tokenizer":
    """Reads what `save` wrote."""

  def _required_id(self, token):
    token_id = self.token_to_id(token)
    if token_id is None:
      raise UserError(f"the tokenizer has no {token} token; retrain it with train_sentencepiece "
                      "or add it with HFTokenizer.add_tokens")
    return token_id

  @property
  def bos_id(self) -> Optional[int]:
    return None  # Qwen3 style: no BOS.

  @property
  def eos_id(self) -> int:
    return self._required_id(ENDOFTEXT)

  @property
  def pad_id(self) -> int:
    return self.eos_id

  @property
  def im_start_id(self) -> int:
    return self._required_id(IM_START)

  @property
  def im_end_id(self) -> int:
    return self._required_id(IM_END)

  @property
  def special_ids(self) -> dict:
    """Ids of the control tokens by their text."""
    return {IM_START: self.im_start_id, IM_END: self.im_end_id, ENDOFTEXT: self.eos_id}


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model with byte fallback (every string encodes, none maps to <unk>).

  Caveat of SentencePiece: a literal U+2581 ('▁') in the input decodes as a space.
  """

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    for token in (ENDOFTEXT,) + CHAT_TOKENS:
      self._required_id(token)

  def encode(self, text):
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids])

  @property
  def vocab_size(self):
    return self._sp.get_piece_size()

  def token_to_id(self, token):
    token_id = self._sp.piece_to_id(token)
    if token_id == self._sp.unk_id() and token != _UNK:
      return None
    return int(token_id)

  def id_to_token(self, token_id):
    return self._sp.id_to_piece(int(token_id))

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SP_MODEL_FILE)
    with open(path, "wb") as f:
      f.write(self._proto)
    return path

  @classmethod
  def load(cls, directory):
    path = directory
    if os.path.isdir(directory):
      path = os.path.join(directory, SP_MODEL_FILE)
    if not os.path.isfile(path):
      raise UserError(f"no SentencePiece model at {path}; train one with train_sentencepiece")
    with open(path, "rb") as f:
      proto = f.read()
    try:
      return cls(proto)
    except (RuntimeError, OSError) as e:
      raise UserError(f"{path} is not a valid SentencePiece model ({e})") from None


def train_sentencepiece(texts: Iterable[str], out_dir: str, vocab_size: int,
                        user_defined_symbols: Sequence[str] = (), model_type: str = "unigram",
                        seed: int = 0, input_sentence_size: int = 200_000,
                        num_threads: int = 1) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on `texts` and saves it to `out_dir`.

  Args:
    texts: training lines (empty ones are skipped).
    out_dir: folder that receives `spiece.model`.
    vocab_size: the total vocabulary size, control, byte and user symbols included. It is an
      upper bound: a small corpus yields fewer pieces.
    user_defined_symbols: strings that are always exactly one token (semantic-ID tokens); the
      chat control tokens are added in front of them.
    model_type: "unigram" or "bpe".
    seed: seeds the subsampling of `texts` down to `input_sentence_size` lines.
    input_sentence_size: at most this many lines are used.
    num_threads: 1 keeps training bit-for-bit reproducible.
  """
  if model_type not in ("unigram", "bpe"):
    raise UserError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
  symbols = list(CHAT_TOKENS)
  for s in user_defined_symbols:
    if s in (ENDOFTEXT, _UNK):
      continue
    if s not in symbols:
      symbols.append(s)
  # unk, eos, the symbols and 256 byte pieces are fixed; a few text pieces must remain.
  minimum = 2 + len(symbols) + 256 + 16
  if vocab_size < minimum:
    raise UserError(f"vocab_size {vocab_size} is too small for {len(symbols)} user symbols and "
                    f"256 byte pieces; use at least {minimum}")
  lines = [t for t in texts if t and t.strip()]
  if not lines:
    raise UserError("train_sentencepiece got no non-empty text lines")
  if len(lines) > input_sentence_size:
    # Subsample ourselves so the result depends only on `seed` (the trainer's own shuffle
    # draws from an unseeded generator).
    keep = np.random.default_rng(seed).choice(len(lines), input_sentence_size, replace=False)
    lines = [lines[i] for i in np.sort(keep)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      byte_fallback=True,
      user_defined_symbols=symbols,
      # Identity normalisation and no dummy prefix so that decode(encode(x)) == x and the
      # ids of concatenated pieces of text decode to the concatenated text.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      unk_id=0,
      eos_id=1,
      eos_piece=ENDOFTEXT,
      bos_id=-1,
      pad_id=-1,
      hard_vocab_limit=False,
      character_coverage=0.9995,
      max_sentence_length=16384,
      shuffle_input_sentence=False,
      input_sentence_size=0,
      num_threads=num_threads,
      minloglevel=2,
  )
  tok = SentencePieceTokenizer(model.getvalue())
  tok.save(out_dir)
  logging.info("trained SentencePiece (%s) on %d lines: %d pieces", model_type, len(lines),
               tok.vocab_size)
  return tok


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` tokenizer (e.g. a Qwen3 `tokenizer.json`).

  `config` holds the HF_CONFIG_KEYS fields of the model's tokenizer_config.json (its chat
  template and named special tokens); `save` writes them back next to tokenizer.json.
  """

  def __init__(self, tokenizer: hf_tokenizers.Tokenizer, config: Optional[dict] = None):
    self._tok = tokenizer
    self.config = {k: v for k, v in (config or {}).items() if k in HF_CONFIG_KEYS}
    missing = [t for t in (ENDOFTEXT,) + CHAT_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
      logging.info("adding missing control tokens %s to the tokenizer", missing)
      self.add_tokens(missing)

  def add_tokens(self, tokens: Sequence[str]) -> int:
    """Adds `tokens` as special tokens (never split, matched verbatim); returns how many were new."""
    added = [hf_tokenizers.AddedToken(t, special=True, normalized=False, single_word=False,
                                      lstrip=False, rstrip=False)
             for t in tokens if self._tok.token_to_id(t) is None]
    if not added:
      return 0
    return self._tok.add_special_tokens(added)

  @property
  def chat_template(self) -> Optional[str]:
    """The model's Jinja chat template, if it came with one."""
    return self.config.get("chat_template")

  def encode(self, text):
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  @property
  def vocab_size(self):
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token):
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id):
    token = self._tok.id_to_token(int(token_id))
    if token is None:
      raise IndexError(f"id {token_id} is outside the vocabulary of {self.vocab_size}")
    return token

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, HF_TOKENIZER_FILE)
    self._tok.save(path)
    if self.config:
      with open(os.path.join(directory, HF_CONFIG_FILE), "w") as f:
        json.dump(self.config, f, indent=2, ensure_ascii=False)
    return path

  @classmethod
  def load(cls, directory):
    path = directory
    if os.path.isdir(directory):
      path = os.path.join(directory, HF_TOKENIZER_FILE)
    if not os.path.isfile(path):
      raise UserError(f"no {HF_TOKENIZER_FILE} at {path}")
    try:
      tok = hf_tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises plain Exception subclasses
      raise UserError(f"{path} is not a valid Hugging Face tokenizer.json ({e})") from None
    config = {}
    config_path = os.path.join(os.path.dirname(path), HF_CONFIG_FILE)
    if os.path.isfile(config_path):
      try:
        with open(config_path) as f:
          config = json.load(f)
      except json.JSONDecodeError as e:
        raise UserError(f"{config_path} is not valid JSON ({e})") from None
      if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object")
    return cls(tok, config)


def load_tokenizer(path: str) -> Tokenizer:
  """Loads the tokenizer in `path` (a folder or the file itself), chosen by the files present.

  `tokenizer.json` -> HFTokenizer; `spiece.model` / `tokenizer.model` / `*.model` ->
  SentencePieceTokenizer.
  """
  if os.path.isfile(path):
    if path.endswith(".json"):
      return HFTokenizer.load(path)
    return SentencePieceTokenizer.load(path)
  if not os.path.isdir(path):
    raise UserError(f"tokenizer path {path} does not exist")
  if os.path.isfile(os.path.join(path, HF_TOKENIZER_FILE)):
    return HFTokenizer.load(path)
  for name in (SP_MODEL_FILE, "tokenizer.model"):
    if os.path.isfile(os.path.join(path, name)):
      return SentencePieceTokenizer.load(os.path.join(path, name))
  models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
  if len(models) == 1:
    return SentencePieceTokenizer.load(os.path.join(path, models[0]))
  raise UserError(f"{path} holds neither {HF_TOKENIZER_FILE} nor one SentencePiece *.model file")

