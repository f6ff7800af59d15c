"""Reading a model from any of its saved forms, and evaluating it on a dataset.

A model can be read from (:func:`load_predictor`):

* ``*.onnx``: an ONNX export, run by onnxruntime (the ``[deploy]`` extra);
* ``*.stablehlo``: a ``jax.export`` artifact (:mod:`picpq_jax.deploy.stablehlo`);
* ``*.npz``: a packed ``picpq compress`` export (``model.npz``), with the
  normalization of the training run that ``config.json`` beside it names;
* a ``picpq compress`` workdir (its ``model.npz``), one of its trained stages
  (``finetune/``: the masked float model; ``qat/``: the masked model with the run's
  quantizer and bit-widths), or a ``picpq train`` workdir (its newest checkpoint).

Each is a function ``images uint8 [N, H, W, C] -> logits float32 [N, K]``, so
:func:`evaluate` treats them alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from picpq_jax.errors import UserError

Predict = Callable[[np.ndarray], np.ndarray]
STABLEHLO_SUFFIX = ".stablehlo"


@dataclasses.dataclass(frozen=True)
class Source:
  """A model and what it needs to read raw images, from a run or a packed export."""

  arch: str  # registry name
  model: nn.Module
  variables: Mapping[str, Any]  # {"params", "batch_stats", "masks", "quant"}
  mean: np.ndarray  # float32 [C], [0, 1] units
  std: np.ndarray  # float32 [C]
  input_shape: tuple[int, int, int]  # one image, (H, W, C)
  kind: str  # "train" (a float checkpoint) or "packed" (a compress export)


def _train_meta(path: str) -> dict[str, Any]:
  """The JSON metadata of the newest intact checkpoint of a ``picpq train`` run."""
  from picpq_jax.engine import load_trained  # pylint: disable=import-outside-toplevel
  return load_trained(path).meta


def _compress_normalization(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, std)`` of the training run a ``picpq compress`` workdir started from."""
  config_path = os.path.join(workdir, "config.json")
  try:
    with open(config_path, encoding="utf-8") as f:
      checkpoint = json.load(f)["checkpoint"]
  except (OSError, ValueError, KeyError):
    raise UserError(f"{config_path} (the compress run's config) is missing or unreadable; "
                    "the packed model's normalization comes from the run it names") from None
  candidates = [checkpoint, os.path.join(workdir, checkpoint)]
  for candidate in candidates:
    if os.path.isdir(candidate):
      norm = _train_meta(candidate)["normalization"]
      return np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
  raise UserError(f"the training run {checkpoint!r} named in {config_path} does not exist; "
                  "the packed model's normalization is read from it")


def _stage_quantizer(path: str):
  """The quantizer a run in ``path`` was trained with: the compress run's for its
  ``qat/`` stage, else full precision."""
  from picpq_jax.compress.quantizers import make_quantizer  # pylint: disable=import-outside-toplevel
  from picpq_jax.models.quantizer import FullPrecision  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(path)
  if path.endswith(os.sep + "checkpoints"):
    path = os.path.dirname(path)
  config = os.path.join(os.path.dirname(path), "config.json")
  if os.path.basename(path) != "qat" or not os.path.isfile(config):
    return FullPrecision()
  with open(config, encoding="utf-8") as f:
    return make_quantizer(json.load(f).get("quantizer", "dorefa"))


def load_source(path: str | os.PathLike) -> Source:
  """The model of a ``picpq train`` workdir, a ``picpq compress`` workdir or its
  ``model.npz`` (see the module doc)."""
  from picpq_jax import models  # pylint: disable=import-outside-toplevel
  from picpq_jax.compress.export import load_exported  # pylint: disable=import-outside-toplevel
  from picpq_jax.engine import load_trained  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  packed = path if path.endswith(".npz") else os.path.join(path, "model.npz")
  if os.path.isfile(packed):
    model, variables = load_exported(packed)
    mean, std = _compress_normalization(os.path.dirname(os.path.abspath(packed)))
    with np.load(packed) as f:
      arch = json.loads(f["header"].tobytes().decode())["model"]
    return Source(arch, model, variables, mean, std, models.get_spec(arch).input_shape,
                  "packed")
  if not os.path.isdir(path):
    raise UserError(f"--from {path} does not exist: pass a .onnx, .stablehlo or .npz file, "
                    "or the workdir of a `picpq train` or `picpq compress` run")
  variables, meta, _ = load_trained(path)
  arch = meta["config"]["arch"]
  model = models.get_model(arch, num_classes=len(meta["class_names"]),
                           quantizer=_stage_quantizer(path))
  norm = meta["normalization"]
  spec = models.get_spec(arch)
  image_size = meta["config"].get("image_size")
  shape = (image_size, image_size, 3) if image_size else spec.input_shape
  return Source(arch, model, variables, np.asarray(norm["mean"], np.float32),
                np.asarray(norm["std"], np.float32), shape, "train")


def _onnx_predictor(path: str, threads: int) -> Predict:
  try:
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("reading .onnx files needs onnxruntime: pip install 'picpq-jax[deploy]'"
                    ) from None
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
  try:
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  except Exception as e:  # onnxruntime raises its own exception types
    raise UserError(f"onnxruntime cannot load {path} ({str(e).splitlines()[0]})") from None
  name = session.get_inputs()[0].name
  return lambda images: session.run(None, {name: np.asarray(images, np.uint8)})[0]


def load_predictor(path: str | os.PathLike, threads: int = 0) -> Predict:
  """``images uint8 [N, H, W, C] -> logits float32 [N, K]`` from any saved form.

  Args:
    path: see the module doc.
    threads: onnxruntime's intra-op threads (0: its default).
  """
  path = os.fspath(path)
  if path.endswith(".onnx"):
    if not os.path.isfile(path):
      raise UserError(f"--from {path} does not exist")
    return _onnx_predictor(path, threads)
  if path.endswith(STABLEHLO_SUFFIX):
    from picpq_jax.deploy.stablehlo import load_stablehlo  # pylint: disable=import-outside-toplevel
    exported = load_stablehlo(path)
    call = jax.jit(exported.call)
    return lambda images: np.asarray(call(np.asarray(images, np.uint8)))
  source = load_source(path)
  from picpq_jax.deploy.stablehlo import stablehlo_function  # pylint: disable=import-outside-toplevel
  call = jax.jit(stablehlo_function(source.model, source.variables, source.mean, source.std))
  return lambda images: np.asarray(call(np.asarray(images, np.uint8)))


def evaluate(predict: Predict, dataset, batch_size: int = 256) -> dict[str, Any]:
  """Accuracy, mean cross-entropy and per-class accuracy of ``predict`` on ``dataset``.

  Args:
    predict: ``images uint8 [B, H, W, C] -> logits [B, K]``.
    dataset: an :class:`~picpq_jax.data.ImageDataset` of N examples.
    batch_size: images per call (the last batch is padded and the padding ignored).

  Returns:
    ``{"count": N, "accuracy", "loss", "per_class": {name: accuracy or None},
    "logits": float32 [N, K]}``; a class with no example gets ``None``.
  """
  from picpq_jax.data.pipeline import eval_batches  # pylint: disable=import-outside-toplevel
  logits = []
  for batch in eval_batches(dataset, batch_size, 0, 1):
    out = np.asarray(predict(batch["image"]), np.float32)
    logits.append(out[np.asarray(batch["mask"])])
  logits = np.concatenate(logits) if logits else np.zeros((0, len(dataset.class_names)))
  labels = np.asarray(dataset.labels)
  if logits.shape[-1] != len(dataset.class_names):
    raise UserError(f"the model has {logits.shape[-1]} outputs but the data has "
                    f"{len(dataset.class_names)} classes; pass the data it was trained on")
  z = logits.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
  correct = logits.argmax(-1) == labels
  per_class = {name: (float(correct[labels == k].mean()) if (labels == k).any() else None)
               for k, name in enumerate(dataset.class_names)}
  return {"count": int(labels.size), "accuracy": float(correct.mean()),
          "loss": float(-log_probs[np.arange(labels.size), labels].mean()),
          "per_class": per_class, "logits": logits}
