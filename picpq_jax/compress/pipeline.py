"""``run_compress``: the whole PIC-PQ pipeline behind ``picpq compress``.

Stages, in order, each saved in the workdir when it finishes so that a stopped
run resumes at the first unfinished one (``--resume``):

1. ``baseline``: the pretrained model's validation accuracy and cost;
2. ``filter_property``: FP of every prunable layer on a few training batches;
3. ``genes``: ``(a, b)`` from regularized evolution (``evolution/`` holds its
   per-generation checkpoints), or ``a = 1, b = 0`` with ``--no-evolution``;
4. ``plan``: PIC importance, masks pruned to the budget, bit-widths from sparsity
   (``--allocation uniform``: the same kept fraction in every group and
   ``--uniform-bits`` for every quantized conv, the baseline of the comparison);
5. ``finetune/``: full-precision fine-tuning of the masked model (a training run);
6. ``qat/``: quantization-aware fine-tuning at the assigned bit-widths;
7. ``compact``/``export``: the kept channels sliced into a small dense model
   (its logits checked against the masked model's) and its weights packed to
   their bit-widths in ``model.npz``;
8. the report (``report.json``, ``report.md``, PNG plots), see :mod:`.report`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax import data as pdata
from picpq_jax import models
from picpq_jax.compress import bits as bits_lib
from picpq_jax.compress import cost_model as cost_lib
from picpq_jax.compress import criteria, evolution, pic, quantizers, report, search
from picpq_jax.compress.compact import compact, zero_pruned_weights
from picpq_jax.compress.export import export, load_exported
from picpq_jax.compress.config import CompressConfig, parse_max_bits
from picpq_jax.compress.prune import prune_to_budget, prune_uniform
from picpq_jax.errors import UserError
from picpq_jax.train import TrainConfig, optim, train_and_evaluate
from picpq_jax.train.checkpoint import load_variables
from picpq_jax.train.loop import evaluate_dataset
from picpq_jax.train.metrics import write_atomic

STAGES = ("baseline", "filter_property", "genes", "plan")


# --- Stage files: small JSON records and flat .npz arrays, written atomically.

def _path(workdir: str, name: str, ext: str) -> str:
  return os.path.join(workdir, f"{name}.{ext}")


def _load_or_run_json(workdir: str, name: str, compute: Callable[[], dict]) -> dict:
  path = _path(workdir, name, "json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  record = compute()
  write_atomic(path, json.dumps(record, indent=2))
  return record


def _load_or_run_arrays(workdir: str, name: str, compute: Callable[[], dict]) -> dict:
  """A ``{key: array}`` dict (keys may hold '/'), cached as ``name.npz``."""
  path = _path(workdir, name, "npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  arrays = {k: np.asarray(v) for k, v in compute().items()}
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return arrays


def _nest(flat: dict, prefix: str) -> dict:
  """``{"quant/a/b": x}`` -> ``{"a": {"b": x}}`` for keys under ``prefix/``."""
  sub = {tuple(k.split("/")[1:]): jnp.asarray(v) for k, v in flat.items()
         if k.startswith(prefix + "/")}
  return flax.traverse_util.unflatten_dict(sub)


def _flat(tree: dict, prefix: str) -> dict:
  return {f"{prefix}/{k}": np.asarray(v)
          for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


# --- Stages.

def _check_workdir(config: CompressConfig) -> None:
  done = [n for n in STAGES if any(os.path.exists(_path(config.workdir, n, e))
                                   for e in ("json", "npz"))]
  if done and not config.resume:
    raise UserError(f"{config.workdir} already holds finished stages ({', '.join(done)}): "
                    f"pass --resume to continue, or choose another --workdir")


def _fp_batches(train: pdata.ImageDataset, config: CompressConfig, mean, std):
  """``fp_batches`` normalized training batches (no augmentation), float32."""
  order = pdata.batch_indices(len(train), min(config.fp_batch_size, len(train)), config.seed, 0)
  for idx in order[:config.fp_batches]:
    yield pdata.normalize(train.images[idx], mean, std)


def _cost_record(structure, masks, quant) -> dict:
  pruned = cost_lib.cost(structure, masks, quant)
  full = cost_lib.full_cost(structure)
  return {
      "flops": float(pruned.macs), "params": float(pruned.params), "bops": float(pruned.bops),
      "flops_full": float(full.macs), "params_full": float(full.params),
      "bops_full": float(full.bops),
      "flops_ratio": float(full.macs / pruned.macs),
      "params_ratio": float(full.params / pruned.params),
      "bops_ratio": float(full.bops / pruned.bops),
  }


def _search_genes(config, model, structure, variables, fp, train, val, mean, std,
                  augment_name: str = "cifar") -> dict:
  num_layers = len(pic.prunable_layers(structure))
  if not config.evolution:
    return {"a": np.ones(num_layers, np.float32), "b": np.zeros(num_layers, np.float32),
            "best_loss_history": np.zeros(0, np.float32)}
  mean_j, std_j = jnp.asarray(mean), jnp.asarray(std)
  train, device_augment = pdata.augmentation(augment_name, train)
  spec = evolution.FitnessSpec(
      model=model, structure=structure,
      tx=optim.sgd_nesterov(config.lr, 0.9, config.weight_decay),
      preprocess_train=lambda k, x: pdata.normalize(device_augment(k, x), mean_j, std_j),
      preprocess_eval=lambda x: pdata.normalize(x, mean_j, std_j),
      target=config.target, metric=config.metric, safeguard=config.safeguard,
      min_channels=config.min_channels, strategy=config.strategy)
  result = search.run_search(spec, config.search_config(), variables, fp, train, val,
                             os.path.join(config.workdir, "evolution"), seed=config.seed,
                             progress=config.progress)
  return {"a": result.a, "b": result.b,
          "best_loss_history": np.asarray(result.best_loss_history, np.float32)}


def _plan(config, arch, structure, variables, fp, genes) -> dict:
  importance = pic.pic_importance(fp, jnp.asarray(genes["a"]), jnp.asarray(genes["b"]),
                                  structure)
  prune = prune_uniform if config.allocation == "uniform" else prune_to_budget
  pruned = prune(importance, structure, config.target, metric=config.metric,
                 safeguard=config.safeguard, min_channels=config.min_channels)
  if not bool(pruned.reached):
    raise UserError(f"--target={config.target} cannot be reached with --safeguard="
                    f"{config.safeguard} and --min-channels={config.min_channels}: "
                    f"raise the target or lower the safeguard")
  max_bits = parse_max_bits(config.max_bits) or bits_lib.reference_max_bits(arch, structure)
  if config.allocation == "uniform":
    quant = bits_lib.uniform_bits(structure, config.uniform_bits, max_bits)
  else:
    quant = bits_lib.assign_bits(structure, variables["params"], pruned.masks, max_bits,
                                 config.penalty)
  return {**_flat(pruned.masks, "masks"), **_flat(quant, "quant")}


def _train_config(config: CompressConfig, train_meta: dict, data: str, name: str,
                  epochs: int) -> TrainConfig:
  return TrainConfig(
      arch=train_meta["arch"], data=data, image_size=train_meta.get("image_size"),
      augment=train_meta.get("augment", "cifar"), workdir=os.path.join(config.workdir, name),
      val_size=train_meta["val_size"], epochs=epochs, batch_size=config.batch_size,
      lr=config.lr, schedule="multistep", momentum=0.9, weight_decay=config.weight_decay,
      seed=config.seed, checkpoint_every=500, resume=True,
      cache_dir=train_meta.get("cache_dir"), progress=config.progress)


def _quantized_start(arch, num_classes, quantizer, variables, masks, quant, input_shape,
                     calibration_images) -> dict:
  """Variables of the quantized model: the fine-tuned ones plus fresh quantizer params."""
  model = models.get_model(arch, num_classes=num_classes, quantizer=quantizer)
  fresh = models.init_variables(model, jax.random.key(0), input_shape)
  params = flax.traverse_util.flatten_dict(fresh["params"])
  params.update(flax.traverse_util.flatten_dict(variables["params"]))
  start = {"params": flax.traverse_util.unflatten_dict(params),
           "batch_stats": variables["batch_stats"], "masks": masks, "quant": quant}
  if isinstance(quantizer, quantizers.LSQ):
    start = quantizers.calibrate_lsq(model, start, calibration_images)
  return start


# Validation images on which the compacted and loaded models are checked against the
# masked one. With fake quantization the two can differ by whole quantization levels:
# their convs sum in different orders, and a value within float rounding of a
# rounding boundary lands on the other level (a ResNet-20 with 2-7-bit DoReFa layers
# measured a logit difference of 0.18 and 1 of 2000 top-1 predictions changed), so
# the report gives the top-1 agreement as well as the largest logit difference.
CHECK_IMAGES = 500


def _compact_and_export(workdir, arch, model, variables, structure, quantizer, images,
                        mean, std) -> dict:
  """Compacts the final model, checks its logits, exports it packed; returns sizes."""
  small_model, small_vars = compact(model, variables, structure)
  x = pdata.normalize(images, mean, std)
  masked_logits = model.apply(variables, x, train=False)
  small_logits = small_model.apply(small_vars, x, train=False)
  info = export(os.path.join(workdir, "model.npz"), arch, small_vars, quantizer,
                model=small_model)
  loaded_model, loaded_vars = load_exported(info.path)
  loaded_logits = loaded_model.apply(loaded_vars, x, train=False)
  return {
      "file": info.path, "file_bytes": info.file_bytes, "float32_bytes": info.float32_bytes,
      "compacted_params": models.param_count(small_vars["params"]),
      "check_images": int(x.shape[0]),
      "compacted_vs_masked_top1_agreement": float(jnp.mean(
          jnp.argmax(small_logits, -1) == jnp.argmax(masked_logits, -1))),
      "compacted_vs_masked_max_logit_diff": float(jnp.max(jnp.abs(small_logits - masked_logits))),
      "loaded_vs_masked_max_logit_diff": float(jnp.max(jnp.abs(loaded_logits - masked_logits))),
      "logits_max_abs": float(jnp.max(jnp.abs(masked_logits))),
  }


def make_quantizer(name: str) -> models.Quantizer:
  return {"dorefa": quantizers.DoReFa, "lsq": quantizers.LSQ, "pact": quantizers.PACT}[name]()


def run_compress(config: CompressConfig, print_fn: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) every stage and writes the report; returns the report record."""
  _check_workdir(config)
  variables, meta, _ = load_variables(config.checkpoint)
  train_meta = meta["config"]
  arch, data = train_meta["arch"], config.data or train_meta["data"]
  spec = models.get_spec(arch)
  mean = np.asarray(meta["normalization"]["mean"], np.float32)
  std = np.asarray(meta["normalization"]["std"], np.float32)
  augment_name = train_meta.get("augment", "cifar")
  dataset = pdata.load_dataset(data, split="train", cache_dir=train_meta.get("cache_dir"),
                               image_size=train_meta.get("image_size"),
                               center_crop=pdata.EVAL_CENTER_CROP[augment_name])
  train, val = pdata.train_val_split(dataset, train_meta["val_size"], train_meta["seed"])
  model = models.get_model(arch, num_classes=len(meta["class_names"]))
  structure = models.model_structure(model, spec.input_shape)
  os.makedirs(config.workdir, exist_ok=True)
  write_atomic(os.path.join(config.workdir, "config.json"), json.dumps(config.to_dict(), indent=2))

  baseline = _load_or_run_json(config.workdir, "baseline", lambda: {
      "val": evaluate_dataset(model, variables, val, config.batch_size, mean, std),
      "cost": _cost_record(structure, variables["masks"], None)})
  fp = _load_or_run_arrays(config.workdir, "filter_property", lambda: criteria.filter_property(
      config.criterion, model, variables, _fp_batches(train, config, mean, std), structure))
  fp = {k: jnp.asarray(v) for k, v in fp.items()}
  genes = _load_or_run_arrays(config.workdir, "genes", lambda: _search_genes(
      config, model, structure, variables, fp, train, val, mean, std, augment_name))
  plan = _load_or_run_arrays(config.workdir, "plan", lambda: _plan(
      config, arch, structure, variables, fp, genes))
  masks, quant = _nest(plan, "masks"), _nest(plan, "quant")
  # Zeroed pruned weights change no masked output and stay zero in fine-tuning; they
  # keep DoReFa's per-kernel max|tanh W| equal to the compacted model's.
  pruned_vars = zero_pruned_weights({**variables, "masks": masks}, structure)
  pruned = _load_or_run_json(config.workdir, "pruned", lambda: {
      "val": evaluate_dataset(model, pruned_vars, val, config.batch_size, mean, std),
      "cost": _cost_record(structure, masks, quant)})

  finetuned = pruned_vars
  if config.ft_epochs:
    train_and_evaluate(_train_config(config, train_meta, data, "finetune", config.ft_epochs),
                       variables=pruned_vars, print_fn=lambda s: None)
    finetuned, _, _ = load_variables(os.path.join(config.workdir, "finetune"))
  quantizer = make_quantizer(config.quantizer)
  qat_start = _quantized_start(
      arch, len(meta["class_names"]), quantizer, finetuned, masks, quant, spec.input_shape,
      next(_fp_batches(train, config, mean, std)))
  final = qat_start
  if config.qat_epochs:
    train_and_evaluate(_train_config(config, train_meta, data, "qat", config.qat_epochs),
                       variables=qat_start, quantizer=quantizer, print_fn=lambda s: None)
    final, _, _ = load_variables(os.path.join(config.workdir, "qat"))
  model_q = models.get_model(arch, num_classes=len(meta["class_names"]), quantizer=quantizer)
  deployed = _compact_and_export(config.workdir, arch, model_q, final, structure, quantizer,
                                 val.images[:CHECK_IMAGES], mean, std)
  results = {
      "arch": arch, "data": data, "checkpoint": os.path.abspath(config.checkpoint),
      "config": config.to_dict(), "baseline": baseline, "pruned": pruned,
      "finetuned": {"val": evaluate_dataset(model, finetuned, val, config.batch_size, mean, std)},
      "final": {"val": evaluate_dataset(model_q, final, val, config.batch_size, mean, std)},
      "genes": {"a": genes["a"].tolist(), "b": genes["b"].tolist()},
      "best_loss_history": genes["best_loss_history"].tolist(),
      "deployed": deployed,
  }
  return report.write_report(config.workdir, results, structure, masks, quant, print_fn)
