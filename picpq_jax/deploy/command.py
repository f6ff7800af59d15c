"""The ``picpq export`` and ``picpq eval`` subcommands; ``register(subparsers)`` adds them.

Examples::

  picpq export --from runs/compress --out runs/compress/deploy   # model.onnx, model.stablehlo
  picpq eval --from runs/compress/deploy/model.onnx --val-size 500   # the embedded images

After ``picpq compress`` (by default on the pretrained ResNet-20 that ships in the
package, into runs/compress); ``--val-size 500`` is that run's validation split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from picpq_jax.errors import UserError
from picpq_jax.options import add_config_options, check, config_from_args, option

FORMATS = ("onnx", "stablehlo")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """Options of ``picpq export``; ``metadata["help"]`` of each field is its ``--help``."""

  source: str = option("", "a `picpq compress` workdir (its packed model.npz), that model.npz, "
                       "or a `picpq train` workdir (the float model)", flags=("--from",))
  out: str = option("", "folder for model.onnx and model.stablehlo (default: <--from>/deploy)")
  formats: str = option("onnx,stablehlo", "comma-separated: onnx (needs the [deploy] extra) "
                        "and/or stablehlo (jax.export, runs on CPU, CUDA and TPU)")

  def __post_init__(self):
    if not self.source:
      raise UserError("--from is required: pass a `picpq compress` or `picpq train` workdir")
    formats = self.formats.split(",")
    check(bool(formats) and all(f in FORMATS for f in formats), "formats", self.formats,
          "a comma-separated subset of " + ",".join(FORMATS))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Options of ``picpq eval``; ``metadata["help"]`` of each field is its ``--help``."""

  source: str = option("", "the model: a .onnx or .stablehlo file from `picpq export`, a packed "
                       "model.npz, or a `picpq compress` or `picpq train` workdir",
                       flags=("--from",))
  data: str = option("embedded", "dataset spec, as for `picpq train --data`")
  split: str = option("train", "the dataset's split to read (e.g. train or test)")
  val_size: int = option(0, "evaluate only the held-out part of the split that `picpq train "
                         "--val-size N --seed S` makes (0: the whole split)")
  seed: int = option(0, "seed of that held-out split")
  image_size: int = option(0, "tfds data only: resize and center-crop to this size, as "
                           "`picpq train --image-size` evaluates (0: as stored)")
  batch_size: int = option(256, "images per forward pass")
  threads: int = option(0, "onnxruntime intra-op threads (0: its default)")
  json: str = option("", "also write the results to this JSON file")

  def __post_init__(self):
    if not self.source:
      raise UserError("--from is required: pass a .onnx, .stablehlo or .npz file or a run")
    check(self.val_size >= 0, "val_size", self.val_size, "0 or more")
    check(self.batch_size >= 1, "batch_size", self.batch_size, "1 or more")
    check(self.image_size >= 0, "image_size", self.image_size, "0 or more")
    check(self.threads >= 0, "threads", self.threads, "0 or more")


def run_export(config: ExportConfig, print_fn=print) -> dict[str, int]:
  """Writes the chosen formats of ``config.source`` to ``config.out``; returns
  ``{file: bytes}``."""
  from picpq_jax.deploy.evaluate import STABLEHLO_SUFFIX, load_source
  source = load_source(config.source)
  out = config.out or os.path.join(
      os.path.dirname(config.source) if config.source.endswith(".npz") else config.source,
      "deploy")
  os.makedirs(out, exist_ok=True)
  sizes = {}
  formats = config.formats.split(",")
  if "onnx" in formats:
    from picpq_jax.deploy.onnx_export import export_onnx
    path = os.path.join(out, "model.onnx")
    sizes[path] = export_onnx(path, source.model, source.variables, source.mean, source.std,
                              source.input_shape)
  if "stablehlo" in formats:
    from picpq_jax.deploy.stablehlo import export_stablehlo
    path = os.path.join(out, "model" + STABLEHLO_SUFFIX)
    sizes[path] = export_stablehlo(path, source.model, source.variables, source.mean,
                                   source.std, source.input_shape)
  for path, size in sizes.items():
    print_fn(f"{path}: {size:,} bytes")
  return sizes


def run_eval(config: EvalConfig, print_fn=print) -> dict:
  """Evaluates ``config.source`` on the data; prints and returns the results."""
  from picpq_jax import data as pdata
  from picpq_jax.deploy.evaluate import evaluate, load_predictor
  from picpq_jax.train.metrics import format_table
  predict = load_predictor(config.source, config.threads)
  crop = pdata.EVAL_CENTER_CROP["imagenet" if config.image_size else "cifar"]
  dataset = pdata.load_dataset(config.data, split=config.split,
                               image_size=config.image_size or None, center_crop=crop)
  if config.val_size:
    _, dataset = pdata.train_val_split(dataset, config.val_size, config.seed)
  results = evaluate(predict, dataset, config.batch_size)
  del results["logits"]
  results = {"source": config.source, "data": config.data, "split": config.split,
             "val_size": config.val_size, "seed": config.seed, **results}
  rows = [("images", results["count"]), ("accuracy", results["accuracy"]),
          ("loss", results["loss"])]
  rows += [(f"accuracy {name}", "-" if acc is None else acc)
           for name, acc in results["per_class"].items()]
  print_fn(format_table(rows))
  if config.json:
    with open(config.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  return results


def _cmd_export(args: argparse.Namespace) -> int:
  run_export(config_from_args(ExportConfig, args))
  return 0


def _cmd_eval(args: argparse.Namespace) -> int:
  run_eval(config_from_args(EvalConfig, args))
  return 0


def register(subparsers: argparse._SubParsersAction) -> None:
  """Adds ``export`` and ``eval`` to ``subparsers`` (from ``parser.add_subparsers``)."""
  export = subparsers.add_parser(
      "export", help="write a compressed (or float) model as ONNX and a jax.export artifact",
      description="Export a `picpq compress` result (weights as integer codes at the plan's "
      "bit-widths, activations through QuantizeLinear/DequantizeLinear) or a `picpq train` "
      "float model to ONNX and to a jax.export StableHLO artifact; both take uint8 images.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_config_options(export, ExportConfig)
  export.set_defaults(run=_cmd_export)
  evaluate = subparsers.add_parser(
      "eval", help="accuracy, loss and per-class accuracy of an exported model or a run",
      description="Evaluate a .onnx (onnxruntime), .stablehlo (jax.export) or packed .npz "
      "model, or a `picpq compress`/`picpq train` workdir, on a dataset split.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_config_options(evaluate, EvalConfig)
  evaluate.set_defaults(run=_cmd_eval)
