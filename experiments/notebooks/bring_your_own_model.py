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
# # Bring your own model
#
# A Flax model you write yourself is compressed by the same PIC-PQ transforms as the
# built-in ones, once it declares its **channel groups**:
#
# 1. every prunable output is multiplied by a mask from `channel_mask(self, group, width)`
#    (the `masks` collection),
# 2. every conv/dense layer is a `QConv`/`QDense` naming the group it reads
#    (`in_group`) and writes (`out_group`), so `model_structure` can build the graph,
# 3. the model has a `group_sizes` field and reads each width through `group_width`, so
#    `compact` can rebuild it with fewer channels.
#
# Set `PICPQ_NOTEBOOK_SIZE=ci` for the tiny run the test suite executes.

# %%
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from tqdm.auto import tqdm

from picpq_jax import data as pdata
from picpq_jax import models
from picpq_jax.compress import bits, compact, cost_model, criteria, pic, prune, zero_pruned_weights

CI = os.environ.get("PICPQ_NOTEBOOK_SIZE") == "ci"
STEPS = 8 if CI else 600


# %% [markdown]
# ## The model: two conv blocks and a classifier, with groups `c1` and `c2`

# %%
class TinyNet(nn.Module):
  """``[N, 32, 32, 3] -> [N, num_classes]``: conv(c1) -> pool -> conv(c2) -> pool -> dense."""
  widths: tuple[int, int] = (16, 32)
  num_classes: int = 10
  quantizer: models.Quantizer = models.FullPrecision()
  group_sizes: models.GroupSizes = None  # set by compact()

  @nn.compact
  def __call__(self, x, train: bool = False):
    group = None
    for i, default in enumerate(self.widths):
      name = f"c{i + 1}"
      width = models.layers.group_width(self.group_sizes, name, default)
      x = models.QConv(width, in_group=group, out_group=name, quantizer=self.quantizer,
                       name=f"conv{i + 1}")(x)
      x = nn.relu(models.batch_norm(train, f"bn{i + 1}")(x))
      x = x * models.channel_mask(self, name, width)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      group = name
    x = x.mean(axis=(1, 2))
    return models.QDense(self.num_classes, in_group=group, quantizer=self.quantizer,
                         name="head")(x)


model = TinyNet()
variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
structure = models.model_structure(model, (32, 32, 3))
print([(g.name, g.size, g.writers) for g in structure.groups])
print(f"{structure.macs:,} MACs, {models.param_count(variables['params']):,} params")

# %% [markdown]
# ## Train it briefly on the embedded CIFAR-10 images

# %%
train_set, val = pdata.train_val_split(pdata.load_embedded(), 500, 0)
mean, std = pdata.channel_stats(train_set.images)
tx = optax.sgd(0.05, momentum=0.9)
opt_state = tx.init(variables["params"])


@jax.jit
def step(variables, opt_state, images, labels):
  def loss_fn(params):
    logits, updates = model.apply({**variables, "params": params}, images, train=True,
                                  mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates
  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  deltas, opt_state = tx.update(grads, opt_state, variables["params"])
  params = optax.apply_updates(variables["params"], deltas)
  return {**variables, "params": params, **updates}, opt_state, loss


def accuracy(model, variables):
  logits = model.apply(variables, pdata.normalize(val.images, mean, std))
  return float(jnp.mean(jnp.argmax(logits, -1) == val.labels))


losses = []
rng = np.random.default_rng(0)
for _ in tqdm(range(STEPS), desc="train"):
  idx = rng.choice(len(train_set), 128, replace=False)
  variables, opt_state, loss = step(variables, opt_state,
                                    pdata.normalize(train_set.images[idx], mean, std),
                                    train_set.labels[idx])
  losses.append(float(loss))
plt.plot(losses); plt.xlabel("step"); plt.ylabel("training loss"); plt.show()
print("validation accuracy", accuracy(model, variables))

# %% [markdown]
# ## Compress it with the same transforms as the built-in models
#
# Filter property (L1 norm of each filter) -> PIC importance `a * FP + b` (here a=1, b=0;
# `picpq compress` learns them) -> prune to half the FLOPs -> bits from each layer's
# sparsity -> cost -> compaction.

# %%
fp = criteria.filter_property("l1", model, variables, None, structure)
layers = pic.prunable_layers(structure)
importance = pic.pic_importance(fp, jnp.ones(len(layers)), jnp.zeros(len(layers)), structure)
pruned = prune.prune_to_budget(importance, structure, 0.5, metric="flops")
masks = pruned.masks
convs = bits.prunable_convs(structure)
quant = bits.assign_bits(structure, variables["params"], masks, [8] * len(convs))
before, after = cost_model.full_cost(structure), cost_model.cost(structure, masks, quant)
print({g: int(m.sum()) for g, m in masks.items()}, "channels kept")
print(f"FLOPs {before.macs:,.0f} -> {after.macs:,.0f}; "
      f"BOPs {before.bops:,.0f} -> {after.bops:,.0f} ({before.bops / after.bops:.1f}x)")
fig, ax = plt.subplots()
ax.bar(list(masks), [float(m.sum()) for m in masks.values()], label="kept")
ax.bar(list(masks), [float(m.size - m.sum()) for m in masks.values()],
       bottom=[float(m.sum()) for m in masks.values()], label="pruned")
ax.set_ylabel("channels"); ax.legend(); plt.show()

# %%
masked = zero_pruned_weights({**variables, "masks": masks, "quant": quant}, structure)
small_model, small_vars = compact(model, masked, structure)
x = pdata.normalize(val.images[:64], mean, std)
diff = jnp.max(jnp.abs(small_model.apply(small_vars, x) - model.apply(masked, x)))
print("compacted group sizes:", dict(small_model.group_sizes))
print("compacted params:", models.param_count(small_vars["params"]))
print("largest logit difference, compacted vs masked:", float(diff))
print("accuracy: trained", accuracy(model, variables), "pruned (no fine-tuning)",
      accuracy(small_model, small_vars))
