"""Workload "stages": where the time of a compression goes, ``picpq compress``
against the PyTorch reference approach at equal settings, stage by stage.

* ``jax/<strategy>``: :func:`picpq_jax.compress.pipeline.run_compress` of the
  bundled pretrained ResNet-20 (cold compiles, a fresh workdir) with the sizes of
  ``cfg`` and the search strategy ``<strategy>``; its ``stage_seconds.json``.
* ``torch.reference``: the reference's way in PyTorch on the same data splits, the
  same sizes and the first JAX run's plan (masks and bits, so both fine-tune the
  same pruned network):

  - setup: the pretrained weights into the PyTorch twin, the data loaded and split;
  - baseline: validation loss and accuracy;
  - filter property: HRank's rank, one ``torch.linalg.matrix_rank`` per map with
    ``.item()`` as the reference (at the maps ``torch_models.feature_maps`` hooks;
    ``l1``: kernel norms);
  - (a, b) search: ``population + generations * children`` candidates, each a deep
    copy physically pruned, ``tau_hat`` SGD steps, validated on the search split
    (``evolution._torch_losses``; the evolution's own bookkeeping is negligible);
  - plan: the plan's model physically pruned and validated;
  - fine-tuning: ``ft_epochs`` epochs of SGD (momentum 0.9, weight decay) at the
    batch size, random crop and flip done in PyTorch, validation after each epoch;
  - QAT: ``qat_epochs`` epochs likewise with DoReFa fake quantization of every
    quantized conv's weights at the plan's bits and of each block's inner
    activation (``conv2``'s input, ``--act-quant inner``);
  - compaction and export: ONNX export of the pruned model;
  - final evaluation.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import common, setups
from experiments.bench import evolution as evo_bench
from picpq_jax import data as pdata
from picpq_jax import engine
from picpq_jax.compress import evolution, pic, pipeline, search
from picpq_jax.compress.compact import kept_channels
from picpq_jax.compress.config import CompressConfig
from picpq_jax.compress.report import STAGE_NAMES
from picpq_jax.train import sgd_nesterov


def _compress_config(cfg, workdir: str, strategy: str) -> CompressConfig:
  return CompressConfig(
      workdir=workdir, criterion=cfg.stages_criterion, fp_batches=cfg.stages_fp_batches,
      population=cfg.stages_population, sample=cfg.stages_sample,
      generations=cfg.stages_generations, children=1, tau_hat=cfg.stages_tau_hat,
      search_val_size=cfg.stages_search_val, ft_epochs=cfg.stages_ft_epochs,
      qat_epochs=cfg.stages_qat_epochs, strategy=strategy, progress=False)


def _dorefa(torch):
  """DoReFa fake quantizers with straight-through rounding (PyTorch)."""

  def level(x, bits):
    n = 2.0 ** bits - 1
    return x + (torch.round(x * n) / n - x).detach()

  def weights(w, bits):
    t = torch.tanh(w)
    return 2 * level(t / (2 * t.abs().max()) + 0.5, bits) - 1

  def activations(x, bits):
    return level(x.clamp(0, 1), bits)

  return weights, activations


def _quantize(torch, module, quant: dict) -> None:
  """Replaces the forward of every quantized conv of ``module`` (in place)."""
  import torch.nn.functional as F
  weights, activations = _dorefa(torch)
  for name, conv in module.named_modules():
    if not isinstance(conv, torch.nn.Conv2d):
      continue
    w_bits = int(quant.get(f"quant/{name.replace('.', '/')}/w_bits", 32))
    a_bits = int(quant.get(f"quant/{name.replace('.', '/')}/a_bits", 32))
    inner = name.endswith("conv2") and a_bits < 32
    if w_bits >= 32 and not inner:
      continue

    def forward(x, c=conv, wb=w_bits, ab=a_bits, q_in=inner):
      w = weights(c.weight, wb) if wb < 32 else c.weight
      return F.conv2d(activations(x, ab) if q_in else x, w, c.bias, c.stride, c.padding)

    conv.forward = forward


def _augment(torch, images: np.ndarray, gen) -> "torch.Tensor":
  """Random 4-pixel-padded crop and horizontal flip of uint8 NHWC -> float NCHW in [0, 1]."""
  import torch.nn.functional as F
  x = setups.torch_nchw(images).float().div_(255.0)
  padded = F.pad(x, (4, 4, 4, 4))
  offsets = torch.randint(0, 9, (x.shape[0], 2), generator=gen)
  out = torch.stack([padded[n, :, i:i + 32, j:j + 32] for n, (i, j) in enumerate(offsets.tolist())])
  flip = torch.rand(x.shape[0], generator=gen) < 0.5
  out[flip] = out[flip].flip(3)
  return out


def _torch_stages(cfg, jax_workdir: str) -> dict[str, float]:
  """Wall seconds of each stage of the reference approach (see the module doc)."""
  import torch
  import torch.nn.functional as F
  from experiments.bench import hrank, torch_models
  seconds, clock = {}, [time.perf_counter()]

  def lap(stage):
    now = time.perf_counter()
    seconds[stage] = now - clock[0]
    clock[0] = now

  config = _compress_config(cfg, jax_workdir, "map")
  source = engine.load_trained(config.checkpoint, print_fn=lambda s: None)
  variables, meta = source.variables, source.meta
  train_meta = meta["config"]
  mean = torch.tensor(meta["normalization"]["mean"], dtype=torch.float32).view(1, 3, 1, 1)
  std = torch.tensor(meta["normalization"]["std"], dtype=torch.float32).view(1, 3, 1, 1)
  augment_name = train_meta.get("augment", "cifar")
  dataset = pdata.load_dataset(train_meta["data"], split="train",
                               cache_dir=train_meta.get("cache_dir"),
                               image_size=train_meta.get("image_size"),
                               center_crop=pdata.EVAL_CENTER_CROP[augment_name])
  train_set, val = pdata.train_val_split(dataset, pipeline.val_size(config, train_meta),
                                         train_meta["seed"])
  model, _, structure = setups.jax_model(train_meta["arch"])
  module = setups.torch_model(train_meta["arch"], variables)
  gen = torch.Generator().manual_seed(0)
  lap("setup")

  def validate(net):
    net.eval()
    correct = total = 0.0
    with torch.inference_mode():
      for start in range(0, len(val), config.batch_size):
        x = (setups.torch_nchw(val.images[start:start + config.batch_size]).float() / 255 - mean) / std
        y = torch.from_numpy(val.labels[start:start + config.batch_size].astype(np.int64))
        logits = net(x)
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
    return correct / len(val)

  def train_epochs(net, epochs):
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=0.9,
                          weight_decay=config.weight_decay)
    for _ in range(epochs):
      net.train()
      order = np.random.default_rng(0).permutation(len(train_set))
      for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
        idx = order[start:start + config.batch_size]
        x = (_augment(torch, train_set.images[idx], gen) - mean) / std
        y = torch.from_numpy(train_set.labels[idx].astype(np.int64))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
      validate(net)

  validate(module)
  lap("baseline")
  names = pic.prunable_layers(structure)
  batches = [train_set.images[i] for i in pdata.batch_indices(
      len(train_set), config.fp_batch_size, config.seed, 0)[:config.fp_batches]]
  if config.criterion == "rank":
    fp = hrank.torch_rank_property(module, [pdata.normalize(b, *(np.asarray(
        meta["normalization"][k], np.float32) for k in ("mean", "std"))) for b in batches],
        [l.name for l in structure.layers if l.out_group is not None], how="loop")
  else:
    state = module.state_dict()
    fp = {n: state[f"{n.replace('/', '.')}.weight"].abs().sum((1, 2, 3)).numpy() for n in names}
  fp = {n: jnp.asarray(fp[n], jnp.float32) for n in names}
  lap("filter_property")
  search_train, scoring = pipeline.search_split(train_set, config)
  sconfig = config.search_config()
  spec = evolution.FitnessSpec(
      model=model, structure=structure, tx=sgd_nesterov(config.lr), target=config.target,
      preprocess_train=evo_bench._preprocess_train, preprocess_eval=evo_bench._preprocess_eval)
  batches_of = lambda g: search.stage_search_data(search_train, scoring, sconfig, config.seed, g)
  a, b = evolution.initial_population(jax.random.key(0), fp, structure, config.population)
  evo_bench._torch_losses(spec, module, variables, fp, batches_of(0), jax.random.key(1), a, b)
  for g in range(config.generations):  # one child per generation, fresh batches
    a, b = evolution.initial_population(jax.random.key(2 + g), fp, structure, 1, identity=False)
    evo_bench._torch_losses(spec, module, variables, fp, batches_of(g + 1), jax.random.key(1),
                            a, b)
  lap("genes")
  with np.load(os.path.join(jax_workdir, "plan.npz")) as f:
    plan = {k: f[k] for k in f.files}
  kept = kept_channels({k.split("/", 1)[1]: v for k, v in plan.items() if k.startswith("masks/")})
  pruned = torch_models.prune_resnet(module, structure, kept)
  validate(pruned)
  lap("plan")
  train_epochs(pruned, config.ft_epochs)
  lap("finetune")
  _quantize(torch, pruned, plan)
  train_epochs(pruned, config.qat_epochs)
  lap("qat")
  pruned.eval()
  torch.onnx.export(pruned, torch.zeros(1, 3, 32, 32), io.BytesIO(), dynamo=False)
  lap("export")
  validate(pruned)
  lap("evaluate")
  return seconds


def run(cfg) -> dict:
  """Stage wall times of ``picpq compress`` (per strategy) and of the reference approach."""
  load_start = common.loadavg()
  rows, workdirs = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for strategy in cfg.stages_strategies:
      workdir = os.path.join(tmp, strategy)
      start = time.perf_counter()
      pipeline.run_compress(_compress_config(cfg, workdir, strategy), print_fn=lambda s: None)
      wall = time.perf_counter() - start
      with open(os.path.join(workdir, pipeline.SECONDS_FILE)) as f:
        rows.append({"variant": f"jax/{strategy}", "seconds": json.load(f), "wall_s": wall})
      workdirs.append(workdir)
      print(f"stages jax/{strategy}: {wall:.1f} s", flush=True)
    if cfg.use_torch:
      start = time.perf_counter()
      seconds = _torch_stages(cfg, workdirs[0])
      rows.append({"variant": "torch.reference", "seconds": seconds,
                   "wall_s": time.perf_counter() - start})
      print(f"stages torch.reference: {rows[-1]['wall_s']:.1f} s", flush=True)
  settings = {k: getattr(cfg, k) for k in (f.name for f in dataclasses.fields(cfg))
              if k.startswith("stages_")}
  res = common.result("stages", settings, rows, load_start)
  print(table(res), flush=True)
  return res


def table(res: dict) -> str:
  """Markdown table: seconds of each stage per variant, and the totals' ratios."""
  rows, c = res["rows"], res["config"]
  stages = [s for s in STAGE_NAMES if any(s in r["seconds"] for r in rows)]
  lines = [[STAGE_NAMES[s], *(common.fmt_s(r["seconds"].get(s)) for r in rows)] for s in stages]
  totals = [sum(r["seconds"].values()) for r in rows]
  lines.append(["total", *(common.fmt_s(t) for t in totals)])
  torch_total = next((t for r, t in zip(rows, totals) if r["variant"] == "torch.reference"), None)
  if torch_total:
    lines.append(["PyTorch total / this total", *(f"{torch_total / t:.2f}" for t in totals)])
  return common.markdown_table(
      f"Stage wall times (s) of a compression of the bundled resnet20: criterion "
      f"{c['stages_criterion']}, population {c['stages_population']}, "
      f"{c['stages_generations']} generations, tau_hat {c['stages_tau_hat']}, search split "
      f"{c['stages_search_val']}, {c['stages_ft_epochs']} + {c['stages_qat_epochs']} epochs",
      ["stage", *(r["variant"] for r in rows)], lines)
