"""``run_compress``: the whole PIC-PQ pipeline behind ``picpq compress``.

Stages, in order, each saved in the workdir when it finishes so that a stopped
run resumes at the first unfinished one (``--resume``). ``stages.json`` records the
config fields each finished stage depended on (:data:`~.config.STAGE_FIELDS`);
``--resume`` with one of them changed is refused in one line, or reruns from the
first affected stage with ``--restart-from STAGE``:

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

``stage_seconds.json`` keeps each stage's wall time: a resumed stage adds the time of
every process that worked on it, a redone one starts again; the parts every run
repeats (``setup``: loading the model and data; ``export``; ``evaluate``: the final
scores) hold the last run's. The report gives the table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax import data as pdata
from picpq_jax import engine
from picpq_jax import models, pretrained
from picpq_jax.compress import bits as bits_lib
from picpq_jax.compress import cost_model as cost_lib
from picpq_jax.compress import criteria, evolution, pic, quantizers, report, search
from picpq_jax.compress.compact import compact, zero_pruned_weights
from picpq_jax.compress.export import export, load_exported
from picpq_jax.compress.config import (FP_POINTS, STAGE_FIELDS, STAGES, CompressConfig,
                                       parse_max_bits)
from picpq_jax.compress.summary import before_after_table
from picpq_jax.compress.prune import prune_to_budget, prune_uniform
from picpq_jax.errors import UserError
from picpq_jax.train import TrainConfig, optim
from picpq_jax.train.loop import evaluate_dataset, train
from picpq_jax.utils import is_primary, read_json, write_json

# What each stage leaves in the workdir (removed when it is redone).
STAGE_FILES = {"baseline": ("baseline.json",), "filter_property": ("filter_property.npz",),
               "genes": ("genes.npz", "evolution", "evolution-damaged"),
               "plan": ("plan.npz", "pruned.json"), "finetune": ("finetune",), "qat": ("qat",)}


# --- Stage files: small JSON records and flat .npz arrays, written atomically.

def _path(workdir: str, name: str, ext: str) -> str:
  return os.path.join(workdir, f"{name}.{ext}")


def _load_or_run_json(workdir: str, name: str, compute: Callable[[], dict]) -> dict:
  path = _path(workdir, name, "json")
  if os.path.exists(path):
    return read_json(path)
  record = compute()
  if is_primary():
    write_json(path, record)
  return record


def _load_or_run_arrays(workdir: str, name: str, compute: Callable[[], dict]) -> dict:
  """A ``{key: array}`` dict (keys may hold '/'), cached as ``name.npz``."""
  path = _path(workdir, name, "npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  arrays = {k: np.asarray(v) for k, v in compute().items()}
  if is_primary():
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

def stage_key(config: CompressConfig, stage: str) -> dict[str, Any]:
  """The config fields ``stage``'s result depends on, its own and earlier stages'."""
  fields = [f for st in STAGES[:STAGES.index(stage) + 1] for f in STAGE_FIELDS[st]]
  return json.loads(json.dumps({f: getattr(config, f) for f in fields}))


def check_stages(config: CompressConfig, workdir: str) -> str | None:
  """The first stage to redo (``--restart-from``, or ``None``), after checking that
  every finished stage before it was made with this config's values; writes nothing."""
  path = os.path.join(workdir, "stages.json")
  saved = read_json(path) if os.path.exists(path) else {}
  redo = config.restart_from or None
  for stage in STAGES[:STAGES.index(redo) if redo else len(STAGES)]:
    if stage not in saved:
      continue
    for field, value in stage_key(config, stage).items():
      if saved[stage].get(field) != value:
        flag = "--from" if field == "checkpoint" else "--" + field.replace("_", "-")
        raise UserError(
            f"cannot resume {workdir}: its {stage} stage was made with {flag}="
            f"{saved[stage].get(field)!r}, not {value!r}: pass {flag} "
            f"{json.dumps(saved[stage].get(field))}, or --restart-from {stage} to redo it "
            f"and the stages after it")
  return redo


def _remove_stages(workdir: str, first: str) -> None:
  """Deletes what ``first`` and every later stage left, and their keys."""
  later = STAGES[STAGES.index(first):]
  for stage in later:
    for name in STAGE_FILES[stage]:
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  for name in ("stages.json", SECONDS_FILE):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      write_json(path, {k: v for k, v in read_json(path).items() if k not in later})


SECONDS_FILE = "stage_seconds.json"


def _lap(workdir: str, clock: dict, stage: str | None) -> None:
  """Ends the timed part ``clock["stage"]`` (adding its wall time to
  ``stage_seconds.json``: summed over runs for a saved stage, replaced for a part
  every run repeats) and starts ``stage`` (``None``: stop timing)."""
  now, done = time.perf_counter(), clock["stage"]
  if done is not None and is_primary():
    path = os.path.join(workdir, SECONDS_FILE)
    saved = read_json(path) if os.path.exists(path) else {}
    earlier = saved.get(done, 0.0) if done in STAGES else 0.0
    write_json(path, {**saved, done: round(earlier + now - clock["start"], 3)})
  clock.update(stage=stage, start=now)


def _begin(config: CompressConfig, workdir: str, stage: str) -> None:
  """Stops here if SIGINT/SIGTERM came; else records ``stage``'s key in ``stages.json``
  (before it runs, so its partial work, e.g. search checkpoints, is covered too)."""
  engine.workdir.stop_if_interrupted(
      f"stopped before the {stage} stage; finished stages are saved in {workdir}: rerun "
      f"with --resume to continue")
  if is_primary():
    path = os.path.join(workdir, "stages.json")
    saved = read_json(path) if os.path.exists(path) else {}
    if stage not in saved:
      write_json(path, {**saved, stage: stage_key(config, stage)})


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


def search_split(train: pdata.ImageDataset, config: CompressConfig
                 ) -> tuple[pdata.ImageDataset, pdata.ImageDataset]:
  """``(train minus search, search)``: the search split that scores candidates is
  carved from the training data (never the validation or test split), as the
  reference holds out 5,000 training images: ``min(search_val_size, N // 5)``
  images drawn with ``config.seed``; the candidates' fine-tuning steps use the rest."""
  return pdata.train_val_split(train, search_split_size(len(train), config), config.seed)


def search_split_size(num_train: int, config: CompressConfig) -> int:
  """How many of ``num_train`` training images :func:`search_split` holds out."""
  return min(config.search_val_size, num_train // 5)


def _search_genes(config, model, structure, variables, fp, train, mean, std,
                  augment_name: str = "cifar") -> dict:
  num_layers = len(pic.prunable_layers(structure))
  if not config.evolution:
    return {"a": np.ones(num_layers, np.float32), "b": np.zeros(num_layers, np.float32),
            "best_loss_history": np.zeros(0, np.float32),
            "best_ever_history": np.zeros(0, np.float32)}
  mean_j, std_j = jnp.asarray(mean), jnp.asarray(std)
  train, scoring = search_split(train, config)
  train, device_augment = pdata.augmentation(augment_name, train)
  spec = evolution.FitnessSpec(
      model=model, structure=structure,
      tx=optim.sgd_nesterov(config.lr, 0.9, config.weight_decay,
                            nesterov=config.search_optimizer == "nesterov"),
      preprocess_train=lambda k, x: pdata.normalize(device_augment(k, x), mean_j, std_j),
      preprocess_eval=lambda x: pdata.normalize(x, mean_j, std_j),
      target=config.target, metric=config.metric, safeguard=config.safeguard,
      min_channels=config.min_channels, strategy=config.strategy)
  result = search.run_search(spec, config.search_config(), variables, fp, train, scoring,
                             os.path.join(config.workdir, "evolution"), seed=config.seed,
                             progress=config.progress)
  return {"a": result.a, "b": result.b,
          "best_loss_history": np.asarray(result.best_loss_history, np.float32),
          "best_ever_history": np.asarray(result.best_ever_history, np.float32)}


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
  if config.act_quant == "inner":
    quant = bits_lib.inner_activation_quant(structure, quant)
  return {**_flat(pruned.masks, "masks"), **_flat(quant, "quant")}


def val_size(config: CompressConfig, train_meta: dict) -> int:
  """Validation images carved from the data: ``--val-size``, else the checkpoint's."""
  return train_meta["val_size"] if config.val_size is None else config.val_size


def _train_config(config: CompressConfig, train_meta: dict, data: str, name: str,
                  epochs: int) -> TrainConfig:
  return TrainConfig(
      arch=train_meta["arch"], data=data, image_size=train_meta.get("image_size"),
      augment=train_meta.get("augment", "cifar"), workdir=os.path.join(config.workdir, name),
      val_size=val_size(config, train_meta), epochs=epochs, batch_size=config.batch_size,
      lr=config.lr, schedule="multistep", momentum=0.9, weight_decay=config.weight_decay,
      seed=config.seed, checkpoint_every=500,
      resume=engine.workdir.holds_run(os.path.join(config.workdir, name)),
      cache_dir=train_meta.get("cache_dir"), progress=config.progress)


def quantized_start(model, quantizer: models.Quantizer, variables: dict, masks: dict,
                    quant: dict, input_shape: tuple[int, ...],
                    calibration: Any = None) -> dict:
  """Variables with which quantization-aware training of ``model`` starts.

  Args:
    model: the quantized model (built with ``quantizer``).
    quantizer: its quantizer.
    variables: trained weights (``params``, ``batch_stats``), possibly without the
      quantizer's parameters.
    masks, quant: the plan's ``{group: [C]}`` masks and ``quant`` collection.
    input_shape: ``(H, W, C)``.
    calibration: normalized float32 images ``[N, H, W, C]`` that initialize LSQ steps
      (needed only when the weights lack them).

  Returns:
    ``{"params", "batch_stats", "masks", "quant"}``: quantizer parameters the weights
    lack start at their initial values (LSQ steps calibrated).
  """
  fresh = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), input_shape))
  params = flax.traverse_util.flatten_dict(variables["params"])
  missing = set(flax.traverse_util.flatten_dict(fresh["params"])) - set(params)
  if missing:
    init = models.init_variables(model, jax.random.key(0), input_shape)["params"]
    params = {**flax.traverse_util.flatten_dict(init), **params}
  start = {"params": flax.traverse_util.unflatten_dict(params),
           "batch_stats": variables["batch_stats"], "masks": masks, "quant": quant}
  if missing and isinstance(quantizer, quantizers.LSQ):
    if calibration is None:
      raise UserError("LSQ steps need calibration images: pass calibration=")
    start = quantizers.calibrate_lsq(model, start, calibration)
  return start


# Validation images on which the compacted and loaded models are checked against the
# masked one. With fake quantization the two can differ by whole quantization levels:
# their convs sum in different orders, and a value within float rounding of a
# rounding boundary lands on the other level (a ResNet-20 with 2-7-bit DoReFa layers
# measured a logit difference of 0.18 and 1 of 2000 top-1 predictions changed), so
# the report gives the top-1 agreement as well as the largest logit difference.
CHECK_IMAGES = 500


# jitted, not op by op; the module is static, so the compacted model and the one
# loaded back from its file (equal modules) share one compilation
_eval_logits = jax.jit(lambda m, v, x: m.apply(v, x, train=False), static_argnums=0)


def _compact_and_export(workdir, arch, model, variables, structure, quantizer, images,
                        mean, std) -> dict:
  """Compacts the final model, checks its logits, exports it packed; returns sizes."""
  small_model, small_vars = compact(model, variables, structure)
  x = pdata.normalize(images, mean, std)
  masked_logits = _eval_logits(model, variables, x)
  small_logits = _eval_logits(small_model, small_vars, x)
  info = export(os.path.join(workdir, "model.npz"), arch, small_vars, quantizer,
                model=small_model)
  loaded_model, loaded_vars = load_exported(info.path)
  loaded_logits = _eval_logits(loaded_model, loaded_vars, x)
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


def load_test_split(data: str, train_meta: dict) -> pdata.ImageDataset | None:
  """The data's ``test`` split (tfds, or an image folder's ``test/``), or ``None`` where
  it has none (the embedded images, a folder with ``train/`` only)."""
  augment = train_meta.get("augment", "cifar")
  try:
    return pdata.load_dataset(data, split="test", cache_dir=train_meta.get("cache_dir"),
                              image_size=train_meta.get("image_size"),
                              center_crop=pdata.EVAL_CENTER_CROP[augment])
  except UserError:
    return None


def run_compress(config: CompressConfig, print_fn: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) every stage and writes the report; returns the report record."""
  clock = {"stage": "setup", "start": time.perf_counter()}
  everything = frozenset(f.name for f in dataclasses.fields(config))
  workdir = engine.open_workdir(config, may_change=everything).path  # the stages check
  redo = check_stages(config, workdir)
  source = engine.load_trained(config.checkpoint)
  variables, meta = source.variables, source.meta
  train_meta = meta["config"]
  arch, data = train_meta["arch"], config.data or train_meta["data"]
  spec = models.get_spec(arch)
  mean = np.asarray(meta["normalization"]["mean"], np.float32)
  std = np.asarray(meta["normalization"]["std"], np.float32)
  augment_name = train_meta.get("augment", "cifar")
  dataset = pdata.load_dataset(data, split="train", cache_dir=train_meta.get("cache_dir"),
                               image_size=train_meta.get("image_size"),
                               center_crop=pdata.EVAL_CENTER_CROP[augment_name])
  train_set, val = pdata.train_val_split(dataset, val_size(config, train_meta),
                                         train_meta["seed"])
  test = load_test_split(data, train_meta)
  num_classes = len(meta["class_names"])
  model = models.get_model(arch, num_classes=num_classes)
  structure = models.model_structure(model, spec.input_shape)
  if redo and is_primary():
    _remove_stages(workdir, redo)
  if is_primary():
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), config.to_dict())

  def begin(stage: str) -> None:
    _begin(config, workdir, stage)
    _lap(workdir, clock, stage)

  def scores(net, net_vars) -> dict:
    """Validation (and, where the data has one, test) accuracy and loss."""
    out = {"val": evaluate_dataset(net, net_vars, val, config.batch_size, mean, std)}
    if test is not None:
      out["test"] = evaluate_dataset(net, net_vars, test, config.batch_size, mean, std)
    return out

  begin("baseline")
  baseline = _load_or_run_json(workdir, "baseline", lambda: {
      **scores(model, variables), "cost": _cost_record(structure, variables["masks"], None)})
  begin("filter_property")
  rank_options = {"point": FP_POINTS[config.fp_point]} if config.criterion == "rank" else {}
  fp = _load_or_run_arrays(workdir, "filter_property", lambda: criteria.filter_property(
      config.criterion, model, variables, _fp_batches(train_set, config, mean, std),
      structure, **rank_options))
  fp = {k: jnp.asarray(v) for k, v in fp.items()}
  begin("genes")
  genes = _load_or_run_arrays(workdir, "genes", lambda: _search_genes(
      config, model, structure, variables, fp, train_set, mean, std, augment_name))
  begin("plan")
  plan = _load_or_run_arrays(workdir, "plan", lambda: _plan(
      config, arch, structure, variables, fp, genes))
  masks, quant = _nest(plan, "masks"), _nest(plan, "quant")
  # Zeroed pruned weights change no masked output and stay zero in fine-tuning; they
  # keep DoReFa's per-kernel max|tanh W| equal to the compacted model's.
  pruned_vars = zero_pruned_weights({**variables, "masks": masks}, structure)
  pruned = _load_or_run_json(workdir, "pruned", lambda: {
      **scores(model, pruned_vars), "cost": _cost_record(structure, masks, quant)})

  begin("finetune")
  finetuned = pruned_vars
  if config.ft_epochs:
    finetuned = train(_train_config(config, train_meta, data, "finetune", config.ft_epochs),
                      variables=pruned_vars, print_fn=lambda s: None)[0].variables
  begin("qat")
  quantizer = quantizers.make_quantizer(config.quantizer)
  model_q = models.get_model(arch, num_classes=num_classes, quantizer=quantizer)
  final = quantized_start(model_q, quantizer, finetuned, masks, quant, spec.input_shape,
                          next(_fp_batches(train_set, config, mean, std)))
  if config.qat_epochs:
    final = train(_train_config(config, train_meta, data, "qat", config.qat_epochs),
                  variables=final, quantizer=quantizer, print_fn=lambda s: None)[0].variables
  engine.workdir.stop_if_interrupted(f"stopped before the export; finished stages are "
                                     f"saved in {workdir}: rerun with --resume to continue")
  _lap(workdir, clock, "export")
  deployed = _compact_and_export(workdir, arch, model_q, final, structure, quantizer,
                                 val.images[:CHECK_IMAGES], mean, std)
  # the pretrained model's weights and BN statistics, 4 bytes each
  deployed["baseline_float32_bytes"] = 4 * models.param_count(
      {k: variables[k] for k in ("params", "batch_stats")})
  _lap(workdir, clock, "evaluate")
  finetuned_scores, final_scores = scores(model, finetuned), scores(model_q, final)
  _lap(workdir, clock, None)
  results = {
      "arch": arch, "data": data, "checkpoint": os.path.abspath(pretrained.resolve(config.checkpoint)),
      "config": config.to_dict(), "baseline": baseline, "pruned": pruned,
      "finetuned": finetuned_scores,
      "final": final_scores,
      "genes": {"a": genes["a"].tolist(), "b": genes["b"].tolist()},
      "best_loss_history": genes["best_loss_history"].tolist(),
      "best_ever_history": genes.get("best_ever_history", np.zeros(0)).tolist(),
      "search_split": search_split_size(len(train_set), config) if config.evolution else 0,
      "deviations": {k: [a, b] for k, (a, b) in config.deviations().items()},
      "deployed": deployed,
      "stage_seconds": read_json(os.path.join(workdir, SECONDS_FILE)) if is_primary() else {},
  }
  record = report.write_report(workdir, results, structure, masks, quant, print_fn)
  print_fn(f"\nBefore and after (report: {os.path.join(workdir, 'report.md')}):\n")
  print_fn(before_after_table(record))
  return record
