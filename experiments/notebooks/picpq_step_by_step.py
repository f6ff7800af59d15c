# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # PIC-PQ step by step
#
# The transforms `picpq compress` chains, one at a time, on the pretrained CIFAR-10
# ResNet-20 that ships in the package (`--from embedded`) and the embedded images:
# filter property -> importance -> pruning to a budget -> bits -> cost -> compaction ->
# export. `picpq compress` adds what is left out here: learning the importance genes
# `(a, b)` by evolution and fine-tuning (full precision, then quantization-aware).
#
# Set `PICPQ_NOTEBOOK_SIZE=ci` for the tiny run the test suite executes.

# %%
import os
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from picpq_jax import data as pdata
from picpq_jax import engine, models
from picpq_jax.compress import (assign_bits, compact, cost, criteria, export, full_cost,
                                layer_costs, load_exported, pic, prune_to_budget,
                                quantizers, reference_max_bits, zero_pruned_weights)
from picpq_jax.compress.pipeline import quantized_start

CI = os.environ.get("PICPQ_NOTEBOOK_SIZE") == "ci"
EVAL_IMAGES, FP_BATCHES, FP_BATCH = (100, 1, 16) if CI else (500, 4, 64)

pretrained = engine.load_trained("embedded")
meta = pretrained.meta
model = models.get_model("resnet20")
variables = pretrained.variables
structure = models.model_structure(model, (32, 32, 3))
mean = np.asarray(meta["normalization"]["mean"], np.float32)
std = np.asarray(meta["normalization"]["std"], np.float32)
train_set, val = pdata.train_val_split(pdata.load_embedded(), meta["config"]["val_size"], 0)
x_val = pdata.normalize(val.images[:EVAL_IMAGES], mean, std)
y_val = val.labels[:EVAL_IMAGES]


def accuracy(model, variables):
  return float(jnp.mean(jnp.argmax(model.apply(variables, x_val), -1) == y_val))


print(f"pretrained ResNet-20: {accuracy(model, variables):.3f} on {EVAL_IMAGES} images "
      "(most of them were in its training set: see experiments/baselines)")

# %% [markdown]
# ## 1. Filter property: how much each filter's output varies (HRank feature-map rank)

# %%
batches = (pdata.normalize(train_set.images[i * FP_BATCH:(i + 1) * FP_BATCH], mean, std)
           for i in range(FP_BATCHES))
fp = criteria.filter_property("rank", model, variables, batches, structure)
layers = pic.prunable_layers(structure)
plt.figure(figsize=(10, 3))
plt.boxplot([np.asarray(fp[l]) for l in layers])
plt.xticks(range(1, len(layers) + 1), layers, rotation=90, fontsize=7)
plt.ylabel("feature-map rank"); plt.title("filter property per layer"); plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Importance `I = a * FP + b` per channel group
#
# Unit genes here (a = 1, b = 0); `picpq compress` learns them by evolution.

# %%
importance = pic.pic_importance(fp, jnp.ones(len(layers)), jnp.zeros(len(layers)), structure)
plt.figure(figsize=(10, 3))
plt.boxplot([np.asarray(v) for v in importance.values()])
plt.xticks(range(1, len(importance) + 1), list(importance), rotation=90, fontsize=7)
plt.ylabel("importance"); plt.title("channel importance per group"); plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Prune to a budget: keep 45% of the FLOPs, least important channels first

# %%
pruned = prune_to_budget(importance, structure, 0.45, metric="flops")
masks = pruned.masks
kept = [float(m.sum()) for m in masks.values()]
sizes = [float(m.size) for m in masks.values()]
plt.figure(figsize=(10, 3))
plt.bar(list(masks), sizes, color="lightgray", label="original")
plt.bar(list(masks), kept, label="kept")
plt.xticks(rotation=90, fontsize=7); plt.ylabel("channels"); plt.legend(); plt.tight_layout()
plt.show()
pruned_vars = zero_pruned_weights({**variables, "masks": masks}, structure)
print(f"pruned, before fine-tuning: {accuracy(model, pruned_vars):.3f}")

# %% [markdown]
# ## 4. Bits from each layer's sparsity: `bits = max_bits - ceil(penalty / sparsity)`

# %%
quant = assign_bits(structure, variables["params"], masks, reference_max_bits("resnet20",
                                                                                  structure))
rows = layer_costs(structure, masks, quant)
names = [l.name for l in structure.layers]
fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
top.bar(names, np.asarray(rows.c_out) / np.array([l.out_features for l in structure.layers]))
top.set_ylabel("output channels kept")
bottom.bar(names, np.asarray(rows.w_bits), color="tab:orange")
bottom.set_ylabel("weight bits"); bottom.set_yscale("log", base=2)
plt.xticks(rotation=90, fontsize=7); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 5. Cost: MACs (FLOPs), parameters and BOPs

# %%
before, after = full_cost(structure), cost(structure, masks, quant)
for name in ("macs", "params", "bops"):
  b, a = float(getattr(before, name)), float(getattr(after, name))
  print(f"{name:>6}: {b:>16,.0f} -> {a:>16,.0f}  ({b / a:.1f}x)")
plt.bar(["FLOPs", "params", "BOPs"], [float(before.macs / after.macs),
                                      float(before.params / after.params),
                                      float(before.bops / after.bops)])
plt.yscale("log"); plt.ylabel("reduction (x)"); plt.show()

# %% [markdown]
# ## 6. Quantize (DoReFa at the planned bits) and compact to a smaller dense model

# %%
quantizer = quantizers.make_quantizer("dorefa")
model_q = models.get_model("resnet20", quantizer=quantizer)
vars_q = quantized_start(model_q, quantizer, pruned_vars, masks, quant, (32, 32, 3))
small_model, small_vars = compact(model_q, vars_q, structure)
masked_logits, small_logits = model_q.apply(vars_q, x_val), small_model.apply(small_vars, x_val)
print(f"compacted: {models.param_count(small_vars['params']):,} parameters "
      f"(from {models.param_count(variables['params']):,}); top-1 agreement with the masked "
      f"model {float(jnp.mean(masked_logits.argmax(-1) == small_logits.argmax(-1))):.3f}; "
      f"quantized, not fine-tuned: {accuracy(small_model, small_vars):.3f}")

# %% [markdown]
# ## 7. Export: bit-packed `.npz` (picpq), ONNX with integer weights (onnxruntime)

# %%
out = tempfile.mkdtemp()
info = export(os.path.join(out, "model.npz"), "resnet20", small_vars, quantizer, model=small_model)
loaded_model, loaded_vars = load_exported(info.path)
print(f"packed file {info.file_bytes:,} bytes against {info.float32_bytes:,} in float32; "
      f"loaded file top-1 agreement "
      f"{float(jnp.mean(loaded_model.apply(loaded_vars, x_val).argmax(-1) == small_logits.argmax(-1))):.3f}")
try:
  import onnxruntime
  from picpq_jax.deploy import export_onnx
  size = export_onnx(os.path.join(out, "model.onnx"), small_model, small_vars, mean, std)
  session = onnxruntime.InferenceSession(os.path.join(out, "model.onnx"))
  onnx_logits = session.run(None, {session.get_inputs()[0].name:
                                   np.asarray(val.images[:EVAL_IMAGES])})[0]  # uint8 images
  print(f"ONNX file {size:,} bytes; top-1 agreement with JAX "
        f"{float(np.mean(onnx_logits.argmax(-1) == np.asarray(small_logits).argmax(-1))):.3f}")
except ImportError:
  print("install the [deploy] extra for the ONNX export")
