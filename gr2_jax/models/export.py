"""A stage artifact as a Hugging Face model folder that transformers loads.

    python -m gr2_jax.models.export --artifact=WORKDIR/sft/HASH --out=DIR [--dtype=bfloat16]

A stage artifact holding a model (midtrain, SFT, RL: `model/` orbax parameters,
`model_config.json`, `tokenizer/`) becomes `config.json` + `model.safetensors` (hf_io's
LlamaForCausalLM or Qwen3ForCausalLM layout), `generation_config.json`, `tokenizer.json` and
`tokenizer_config.json`, so that `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` give the same logits and the same token ids as here.

The tokenizer is exported as the pipeline uses it:
- `tokenizer.json` is the artifact's own (a Hugging Face or GGUF base model's, with the SID
  tokens appended as added tokens). The SID tokens are written as non-special added tokens, so
  `decode(..., skip_special_tokens=True)` keeps the re-ranker's answer.
- `tokenizer_config.json`: `PreTrainedTokenizerFast`, the base model's chat template (or, when
  it had none, the ChatML template of `gr2_jax.text.chat.render_chat`), its named special
  tokens (eos `<|im_end|>` by default), and no BOS/EOS added on encoding (the pipeline adds
  none).
- `generation_config.json`: generation stops at `<|im_end|>` or `<|endoftext|>`, as the
  pipeline's sampling does (`chat.chat_stop_ids`).

A SentencePiece artifact (a model trained here from scratch) has no tokenizer.json that
transformers reads: exporting it is a UserError unless `model_only=True` (`--model_only`),
which writes the weights and configs alone.
"""

import json
import os
import re
import shutil
import sys

from absl import app
from absl import flags
import tokenizers as hf_tokenizers

from gr2_jax.errors import UserError
from gr2_jax.models import artifact
from gr2_jax.models import hf_io
from gr2_jax.sids import tokens as sid_lib
from gr2_jax.text import tokenizers

TOKENIZER_DIR = "tokenizer"
GENERATION_CONFIG_FILE = "generation_config.json"
# The layout of gr2_jax.text.chat.render_chat, as a Jinja chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_SID_TOKEN = re.compile(r"<s_[a-z]_\d+>|" + re.escape(sid_lib.SID_BEGIN) + "|"
                        + re.escape(sid_lib.SID_END))


def _non_special_sids(path):
  """Rewrites the tokenizer.json at `path` with its SID added tokens not special."""
  with open(path) as f:
    spec = json.load(f)
  for entry in spec.get("added_tokens", []):
    if _SID_TOKEN.fullmatch(entry["content"]):
      entry["special"] = False
  text = json.dumps(spec, indent=2, ensure_ascii=False)
  hf_tokenizers.Tokenizer.from_str(text)  # still a valid tokenizer
  with open(path, "w") as f:
    f.write(text)


def special_ids(tok):
  """{"bos_token_id", "eos_token_id", "pad_token_id"} of an artifact's tokenizer (None absent).

  eos is the token that ends an assistant turn (the config's eos_token, `<|im_end|>` by
  default), pad the pipeline's pad token unless the config names one.
  """
  config = getattr(tok, "config", {})
  bos = config.get("bos_token")
  eos = config.get("eos_token", tokenizers.IM_END)
  pad = config.get("pad_token")
  return {"bos_token_id": tok.token_to_id(bos) if bos else None,
          "eos_token_id": tok.token_to_id(eos),
          "pad_token_id": tok.token_to_id(pad) if pad else tok.pad_id}


def export_tokenizer(tok, out_dir):
  """Writes tokenizer.json and tokenizer_config.json of an HFTokenizer (module docstring)."""
  _non_special_sids(tok.save(out_dir))
  config = dict(tok.config)
  config.setdefault("chat_template", CHATML_TEMPLATE)
  config.setdefault("eos_token", tokenizers.IM_END)
  config.setdefault("pad_token", tok.id_to_token(tok.pad_id))
  config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False,
                add_eos_token=False, clean_up_tokenization_spaces=False)
  with open(os.path.join(out_dir, tokenizers.HF_CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)


def export_artifact(artifact_dir, out_dir, *, dtype=None, model_only=False):
  """Writes the model (and tokenizer) of a stage artifact as a Hugging Face folder `out_dir`.

  Args:
    artifact_dir: a midtrain, sft or rl artifact (`model/`, `model_config.json`, `tokenizer/`).
    out_dir: a new or empty folder; it appears complete or not at all.
    dtype: the safetensors dtype ("float32", "bfloat16", "float16"); default: the parameters'.
    model_only: export the weights and configs without the tokenizer (the only way for a
      SentencePiece artifact).
  Returns:
    out_dir.
  """
  if dtype not in (None, "float32", "bfloat16", "float16"):
    raise UserError(f"dtype {dtype!r} must be one of float32, bfloat16, float16")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise UserError(f"{out_dir} is not empty; export into a new folder")
  tok_dir = os.path.join(artifact_dir, TOKENIZER_DIR)
  tok = None
  if os.path.isdir(tok_dir):
    tok = tokenizers.load_tokenizer(tok_dir)
  if not model_only and not isinstance(tok, tokenizers.HFTokenizer):
    what = "no tokenizer/" if tok is None else "a SentencePiece tokenizer"
    raise UserError(f"{artifact_dir} has {what}, which transformers cannot load (only an "
                    "artifact started from a Hugging Face checkpoint or a GGUF file has a "
                    "tokenizer.json); pass --model_only to export the weights alone")
  model = artifact.load_model(artifact_dir)
  cfg = model.cfg
  ids = special_ids(tok) if tok is not None else {}
  tmp = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  hf_io.export_hf_checkpoint(model, cfg, tmp, dtype=dtype, config_overrides=ids)
  if ids:
    stops = [ids["eos_token_id"], tok.eos_id]
    generation = {"bos_token_id": ids["bos_token_id"], "pad_token_id": ids["pad_token_id"],
                  "eos_token_id": list(dict.fromkeys(i for i in stops if i is not None))}
    with open(os.path.join(tmp, GENERATION_CONFIG_FILE), "w") as f:
      json.dump(generation, f, indent=2)
  if not model_only:
    export_tokenizer(tok, tmp)
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)  # empty, checked above
  os.replace(tmp, out_dir)
  return out_dir


_ARTIFACT = flags.DEFINE_string("artifact", None, "Stage artifact folder holding a model.")
_OUT = flags.DEFINE_string("out", None, "New folder for the Hugging Face model.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "safetensors dtype; default: the parameters' dtype.")
_MODEL_ONLY = flags.DEFINE_bool("model_only", False,
                                "Export the weights and configs without the tokenizer.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _ARTIFACT.value or not _OUT.value:
    print("error: --artifact=DIR and --out=DIR are both required", file=sys.stderr)
    sys.exit(2)
  try:
    out = export_artifact(_ARTIFACT.value, _OUT.value, dtype=_DTYPE.value,
                          model_only=_MODEL_ONLY.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"exported {_ARTIFACT.value} to {out}")


if __name__ == "__main__":
  app.run(main)
