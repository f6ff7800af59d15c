"""A tiny attention block for the fine-tuning method tests (shared by several files).

Dense layers are named like the BERT encoder's (``attention/{query,key,value,output}``,
``mlp/{intermediate,output}``, ``head/classifier``) so the same patterns select them;
it takes an optional soft ``prompt`` ``[P, H]`` like the encoder.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

VOCAB, HIDDEN, CLASSES, LENGTH = 11, 8, 3, 5


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.Dense(HIDDEN, name=n)(x) for n in ("query", "key", "value"))
    att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(HIDDEN), axis=-1)
    return nn.Dense(HIDDEN, name="output")(att @ v)


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(HIDDEN, name="output")(nn.gelu(nn.Dense(2 * HIDDEN, name="intermediate")(x)))


class Toy(nn.Module):
  """ids int [B, L] (prompt [P, H]) -> logits [B, CLASSES]."""

  @nn.compact
  def __call__(self, ids, prompt=None):
    x = nn.Embed(VOCAB, HIDDEN, name="word_embeddings")(ids)
    if prompt is not None:
      x = jnp.concatenate([jnp.broadcast_to(prompt, (x.shape[0],) + prompt.shape), x], 1)
    x = nn.LayerNorm(name="norm")(x + Attention(name="attention")(x))
    x = x + Mlp(name="mlp")(x)
    return nn.Dense(CLASSES, name="head")(x.mean(1))


@functools.cache
def _init(seed: int) -> dict:
  x = jnp.zeros((1, LENGTH), jnp.int32)
  return jax.jit(Toy().init)(jax.random.key(seed), x)["params"]


def toy_params(seed: int = 0) -> dict:
  """The toy's params (a fresh dict of the same, never-donated arrays on each call)."""
  return jax.tree.map(lambda x: x, _init(seed))


def toy_batch(seed: int = 1, batch: int = 4) -> dict:
  kx, ky = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.randint(kx, (batch, LENGTH), 0, VOCAB),
          "y": jax.random.randint(ky, (batch,), 0, CLASSES)}


def toy_loss(params, batch, key=None, prompt=None):
  """Mean softmax cross-entropy of the toy model (``key`` unused: no dropout)."""
  del key
  logits = Toy().apply({"params": params}, batch["x"], prompt)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
