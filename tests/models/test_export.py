"""A stage artifact exported as a Hugging Face folder, loaded by transformers: the same logits,
greedy tokens and token ids as here."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gr2_jax.errors import UserError
from gr2_jax.models import export
from gr2_jax.models import qwen3
from gr2_jax.sampling import sampler
from gr2_jax.sids import tokens as sid_lib
from gr2_jax.text import chat
from gr2_jax.text import tokenizers
from gr2_jax.models import artifact as artifact_lib
from tests.text.test_tokenizers import _byte_level_hf
from tests.text.test_tokenizers import _corpus

# The PyTorch reference is a test extra: missing, the parity tests fail instead of skipping.
import torch  # pylint: disable=g-import-not-at-top,wrong-import-order
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SID = "<|sid_begin|><s_a_3><s_b_7><s_c_1><s_d_0><|sid_end|>"
MESSAGES = [
    [{"role": "system", "content": "Rank the candidates."},
     {"role": "user", "content": f"watched {SID} Toy Story (1995); candidates <s_a_5><s_b_2>"}],
    [{"role": "system", "content": "Rank the candidates."},
     {"role": "user", "content": "the night <|sid_begin|><s_a_0><s_b_1><|sid_end|> drama"}],
]


def _llama(vocab_size):
  """A Llama-shaped model (no q/k norm, untied head, 6 padding rows) with varied outputs."""
  cfg = qwen3.ModelConfig(vocab_size=vocab_size + 6, hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, mlp_dim=128, rope_theta=1e4,
                          rms_eps=1e-5, tie_embeddings=False, qk_norm=False)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def draw(x):
    if x.ndim == 1:  # norm scales
      return jnp.asarray(1.0 + 0.2 * rng.normal(size=x.shape), jnp.float32)
    return jnp.asarray(rng.normal(size=x.shape) * 2.0 / np.sqrt(x.shape[0]), jnp.float32)

  return nnx.merge(graphdef, jax.tree.map(draw, state))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
  """A stage artifact as the stages write it, with a byte-level BPE tokenizer."""
  path = str(tmp_path_factory.mktemp("artifact"))
  tok = tokenizers.HFTokenizer(_byte_level_hf(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
  tok.add_tokens(sid_lib.all_sid_tokens(4, 8))
  model = _llama(tok.vocab_size)
  artifact_lib.save_model(path, model, tok)
  return path, model, tok


@pytest.fixture(scope="module")
def exported(artifact, tmp_path_factory):
  """The artifact exported through the command line."""
  out = str(tmp_path_factory.mktemp("hf") / "model")
  proc = subprocess.run(
      [sys.executable, "-m", "gr2_jax.models.export", f"--artifact={artifact[0]}",
       f"--out={out}"], cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return out


def test_transformers_logits_and_greedy_tokens_equal_ours(artifact, exported):
  _, model, tok = artifact
  hf = transformers.AutoModelForCausalLM.from_pretrained(exported).float().eval()
  assert type(hf).__name__ == "LlamaForCausalLM"
  prompts = [chat.encode_chat(m, tok, add_generation_prompt=True) for m in MESSAGES]
  graphdef, state = nnx.split(model)
  for ids in prompts:
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    ours, _ = jax.jit(qwen3.apply, static_argnums=0)(graphdef, state,
                                                     jnp.asarray([ids], jnp.int32), positions)
    with torch.no_grad():
      theirs = hf(input_ids=torch.tensor([ids])).logits.numpy()
    err = np.abs(np.asarray(ours) - theirs).max()
    print(f"max abs logit diff {err:.2e} at logit scale {np.abs(theirs).max():.1f}")
    assert err <= 1e-4

  # Greedy: ours stops at the generation config's stop tokens, as generate() does.
  with open(os.path.join(exported, "generation_config.json")) as f:
    stops = json.load(f)["eos_token_id"]
  assert stops == [tok.im_end_id, tok.eos_id]
  out = sampler.sample(model, prompts, key=jax.random.key(0), max_new_tokens=8, greedy=True,
                       stop_tokens=stops, pad_id=tok.pad_id)
  np.testing.assert_array_equal(out.lengths, [8, 8])  # no early stop: 8 tokens compared
  ours = np.asarray(out.tokens)
  assert len({tuple(r) for r in ours}) == 2 and len(set(ours[0])) > 2  # varied outputs
  for ids, want in zip(prompts, ours):
    with torch.no_grad():
      gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                        max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(gen[0, len(ids):].numpy(), want)


def test_transformers_tokenizer_ids_equal_ours(artifact, exported):
  _, _, tok = artifact
  hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
  texts = [chat.render_chat(m, add_generation_prompt=True) for m in MESSAGES]
  texts += [f"{SID} Toy Story (1995) | Comedy", "<s_d_7>x<s_a_0> <|sid_end|>\n\ttabs"]
  for text in texts:
    ids = tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids  # no BOS / EOS added
    assert hf_tok.decode(ids) == text
  # SID tokens are single ids and survive skip_special_tokens; the chat tokens do not.
  sid_ids = [tok.token_to_id(t) for t in ("<|sid_begin|>", "<s_a_3>", "<s_b_7>", "<|sid_end|>")]
  assert hf_tok.convert_tokens_to_ids(["<|sid_begin|>", "<s_a_3>", "<s_b_7>", "<|sid_end|>"]) == (
      sid_ids)
  answer = tok.encode(f"{SID}<|im_end|>")
  assert hf_tok.decode(answer, skip_special_tokens=True) == SID
  assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_token_id == tok.im_end_id
  assert hf_tok.pad_token_id == tok.pad_id
  # Without a chat template of its own, the tokenizer gets the pipeline's ChatML layout.
  for messages in MESSAGES:
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        chat.render_chat(messages, add_generation_prompt=True))
  with open(os.path.join(exported, "config.json")) as f:
    config = json.load(f)
  assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (
      tok.im_end_id, tok.pad_id, None)


def test_base_model_chat_template_and_special_tokens_are_kept(tmp_path):
  template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
  tok = tokenizers.HFTokenizer(_byte_level_hf(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                               config={"chat_template": template, "eos_token": "<|endoftext|>",
                                       "bos_token": "<|im_start|>", "add_bos_token": True})
  export.export_tokenizer(tok, str(tmp_path))
  with open(tmp_path / "tokenizer_config.json") as f:
    config = json.load(f)
  assert config["chat_template"] == template
  assert (config["eos_token"], config["bos_token"]) == ("<|endoftext|>", "<|im_start|>")
  assert config["add_bos_token"] is False  # the pipeline never adds one
  assert export.special_ids(tok) == {"bos_token_id": tok.im_start_id,
                                     "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def test_sentencepiece_artifact_needs_model_only(tmp_path):
  tok = tokenizers.train_sentencepiece(_corpus(), str(tmp_path / "a" / "tokenizer"),
                                       vocab_size=400, seed=0)
  cfg = qwen3.get_model_config("tiny", vocab_size=-(-tok.vocab_size // 128) * 128)
  artifact_lib.save_model(str(tmp_path / "a"), qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)), tok)
  out = str(tmp_path / "hf")
  with pytest.raises(UserError, match="SentencePiece tokenizer.*--model_only"):
    export.export_artifact(str(tmp_path / "a"), out)
  assert not os.path.exists(out)
  export.export_artifact(str(tmp_path / "a"), out, model_only=True, dtype="bfloat16")
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                     "model.safetensors"]
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert (config["eos_token_id"], config["dtype"]) == (tok.im_end_id, "bfloat16")
  with pytest.raises(UserError, match="not empty"):
    export.export_artifact(str(tmp_path / "a"), out, model_only=True)
  with pytest.raises(UserError, match="holds no model"):
    export.export_artifact(str(tmp_path / "a" / "tokenizer"), str(tmp_path / "x"),
                           model_only=True)
