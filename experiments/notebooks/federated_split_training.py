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
# # Federated split training on a simulated 8-device mesh
#
# The pieces `picpq federated` runs, one at a time: a `clients` device mesh, a non-IID
# partition of the embedded CIFAR-10 images over 8 clients, a ResNet-8 cut into a client
# part (the edge device) and a server part, the exact bytes each round sends, and a few
# rounds of split training (SplitFed-V1) against FedAvg from the same initial weights.
#
# XLA can split this machine's CPU into 8 devices, but only when told so before JAX
# starts: the first cell sets `XLA_FLAGS` and only then imports JAX (a notebook kernel
# is a fresh process; restart it if JAX was imported already).
#
# Set `PICPQ_NOTEBOOK_SIZE=ci` for the tiny run the test suite executes.

# %%
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import functools
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display
from tqdm.auto import tqdm

from picpq_jax import data as pdata
from picpq_jax import federated, models
from picpq_jax.federated import rounds
from picpq_jax.federated.run import client_round_batch
from picpq_jax.federated.steps import constants
from picpq_jax.train import optim
from picpq_jax.train.loop import evaluate_dataset
from picpq_jax.utils import plot_rounds_and_bytes

# JAX's "rbg" generator instead of the default threefry: the same programs compile in a
# fraction of the time on CPU (ResNet-8's initialization: 1.5 s instead of 5.8 s of CPU
# on this machine's EPYC, results/prng_compile.md); the draws differ from `picpq
# federated`'s.
jax.config.update("jax_default_prng_impl", "rbg")

CI = os.environ.get("PICPQ_NOTEBOOK_SIZE") == "ci"
# rounds, local steps E, client batch B, training images, validation images
ROUNDS, LOCAL_STEPS, BATCH, TRAIN_IMAGES, VAL_IMAGES = ((2, 1, 8, 800, 100) if CI
                                                        else (20, 10, 32, 0, 500))
CLIENTS, CUT, ALPHA, LR = 8, 1, 0.3, 0.05
print(jax.device_count(), "devices:", jax.devices())
print("settings:", {"rounds": ROUNDS, "local_steps": LOCAL_STEPS, "batch": BATCH,
                    "clients": CLIENTS, "cut": CUT})

# %% [markdown]
# ## The mesh: one axis, `clients`
#
# Every participating client lives on one device of the `clients` axis (8 clients per
# round over 8 devices: one each). A round's programs are `jax.shard_map` s over this axis;
# averaging the clients' models is a `psum` across it.

# %%
mesh = federated.clients_mesh(CLIENTS)
print("mesh axes", mesh.axis_names, "shape", dict(mesh.shape))
print("device of each client:", [d.id for d in mesh.devices])

# %% [markdown]
# ## A non-IID partition: Dirichlet over labels (alpha = 0.3)
#
# Each class's images are cut among the clients by a Dirichlet draw, so every client
# holds a few dominant classes.

# %%
train_set, val = pdata.train_val_split(pdata.load_embedded(), VAL_IMAGES, 0)
if TRAIN_IMAGES:
  train_set = train_set.subset(np.sort(
      np.random.default_rng(0).permutation(len(train_set))[:TRAIN_IMAGES]))
client_data = federated.dirichlet_partition(train_set.labels, CLIENTS, ALPHA, seed=0)
hist = federated.label_histogram(train_set.labels, client_data, train_set.num_classes)
print(federated.format_histogram(hist, train_set.class_names))
fig, ax = plt.subplots(figsize=(8, 3))
bottom = np.zeros(CLIENTS)
for c, name in enumerate(train_set.class_names):
  ax.bar(range(CLIENTS), hist[:, c], bottom=bottom, label=name)
  bottom += hist[:, c]
ax.set(xlabel="client", ylabel="images", title=f"Dirichlet partition, alpha={ALPHA}")
ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1, 1)); plt.show()

# %% [markdown]
# ## The model cut in two
#
# `split_model` cuts ResNet-8 after stage 1: the client runs the stem and stage 1 and
# sends the *smashed data* (its activations, `32x32x16` per image) to the server, which
# runs stages 2 and 3 and the head and sends back the smashed data's gradient. Both parts
# are the same Flax module with a different `span`, so their variables are subtrees of
# the whole model's.

# %%
model = models.get_model("resnet8", num_classes=train_set.num_classes)
split = federated.split_model(model, CUT)
variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
client_vars, server_vars = split.split(variables)
smashed = jax.eval_shape(lambda v, x: split.client.apply(v, x), client_vars,
                         jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32))
print("valid cuts:", federated.valid_cuts(model))
for side, keys, part in (("client", split.client_keys, client_vars),
                         ("server", split.server_keys, server_vars)):
  print(side, "holds", dict(keys)["params"], f"{models.param_count(part['params']):,} params")
print("smashed data per client batch:", smashed.shape, smashed.dtype)

# %% [markdown]
# ## Bytes per round, from the shapes
#
# Per participating client and round, split training sends the smashed batch up and its
# gradient down at each of the `E` local steps (plus the labels up), and exchanges the
# client part (parameters and BN statistics) once; FedAvg exchanges the whole model once.
# `federated.split_traffic` / `fedavg_traffic` count them exactly from shapes and dtypes.

# %%
def exchanged(v):
  """What a client sends back each round: its parameters and BN statistics."""
  return {"params": v["params"], "batch_stats": v["batch_stats"]}


labels = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
traffic = {
    "splitfed": federated.split_traffic(smashed, labels, exchanged(client_vars), CLIENTS,
                                        LOCAL_STEPS),
    "fedavg": federated.fedavg_traffic(exchanged(variables), CLIENTS),
}
for name, t in traffic.items():
  print(f"{name} bytes per round: {t.total_bytes}")
  print("   up", t.up, "down", t.down)

# %% [markdown]
# ## Train: a few rounds of each method from the same initial weights
#
# `rounds.parallel_round` runs one round: every client trains its own copy for `E` local
# steps (`split_step`: client forward, server forward and backward, client backward;
# `model_step`: the whole model), then the copies are averaged with the clients' sample
# counts as weights. The clients' optimizer state (SGD with Nesterov momentum, learning
# rate 1, scaled by the schedule's value each step) restarts every round.

# %%
tx = optim.sgd_nesterov(1.0, 0.9, 5e-4)
schedule = optim.make_schedule("cosine", LR, ROUNDS * LOCAL_STEPS)
mean, std = pdata.channel_stats(train_set.images)
mean_j, std_j = jnp.asarray(mean), jnp.asarray(std)


def preprocess(key, images):
  return pdata.normalize(pdata.augment(key, images), mean_j, std_j)


def program(method):
  """``(round_fn, parts, consts, whole-model variables of parts)`` of a method."""
  if method == "splitfed":
    step = functools.partial(federated.split_step, split, tx)
    parts = {"client": federated.PartState.create(client_vars, tx),
             "server": federated.PartState.create(server_vars, tx)}
    consts = {"client": constants(client_vars),
              "server": constants(server_vars)}
    whole = lambda p: split.merge(p["client"].variables(consts["client"]),
                                  p["server"].variables(consts["server"]))
    reset = ("client",)  # the server copies' momentum is averaged on the server
  else:
    step = functools.partial(federated.model_step, model, tx)
    parts = {"model": federated.PartState.create(variables, tx)}
    consts = {"model": constants(variables)}
    whole = lambda p: p["model"].variables(consts["model"])
    reset = ("model",)
  round_fn = rounds.parallel_round(step, tx, preprocess, mesh, reset=reset)
  return round_fn, parts, consts, whole


history = {}
ids = np.arange(CLIENTS)  # every client takes part in every round
for method in ("splitfed", "fedavg"):
  round_fn, parts, consts, whole = program(method)
  parts, consts = jax.device_put((parts, consts), jax.NamedSharding(mesh, jax.P()))
  records, sent = [], 0
  for r in tqdm(range(ROUNDS), desc=method):
    batch = client_round_batch(mesh, train_set, client_data, ids, 0, r, LOCAL_STEPS, BATCH)
    lrs = jnp.asarray(schedule(r * LOCAL_STEPS + np.arange(LOCAL_STEPS)), jnp.float32)
    key = jax.random.fold_in(jax.random.key(1), r)
    parts, sums = round_fn(parts, consts, batch, lrs, key, jnp.int32(32))
    sent += traffic[method].total_bytes
    ev = evaluate_dataset(model, jax.device_get(whole(parts)), val, 100, mean, std)
    records.append({"round": r + 1, "cumulative_bytes": sent,
                    "train_loss": float(sums["loss_sum"] / sums["count"]),
                    "val_loss": ev["loss"], "val_accuracy": ev["accuracy"]})
  history[method] = records
  print(f"{method} round 1 training loss: {records[0]['train_loss']!r}")
  print(f"{method}: validation accuracy {records[-1]['val_accuracy']:.3f} after {ROUNDS} "
        f"rounds, {sent / 1e6:.1f} MB sent")

# %% [markdown]
# ## Accuracy and loss against rounds and against bytes
#
# Per round, split training trains the same model with every client's data, but it pays
# for each local step in smashed data; FedAvg pays once per round for the whole model.
# Which one reaches an accuracy with fewer bytes depends on the cut, the batch, `E` and
# the model's size (`picpq federated` reports the same curves for any of them).

# %%
with tempfile.TemporaryDirectory() as tmp:
  for key, label in (("val_accuracy", "validation accuracy"), ("val_loss", "validation loss")):
    path = os.path.join(tmp, f"{key}.png")
    plot_rounds_and_bytes({m: (recs, "-") for m, recs in history.items()}, path, key, label,
                          label.split()[-1], title=f"{CLIENTS} clients, Dirichlet {ALPHA}, "
                          f"E={LOCAL_STEPS}, B={BATCH}")
    display(Image(filename=path))
