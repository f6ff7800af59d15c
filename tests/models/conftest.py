"""Shared fixtures for the model tests: abstract variables and cheap random ones.

``model.init`` draws every parameter with threefry under XLA, which takes seconds
per model on a small CPU; the tests only need *some* values, so they fill the
shapes from ``jax.eval_shape`` with NumPy draws instead (BN statistics included,
so a BN shift is never trivially zero).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.models import FULL_PRECISION_BITS, get_model, get_spec, model_structure


@functools.cache
def _abstract(name: str):
  spec = get_spec(name)
  model = get_model(name)
  x = jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return model, spec, variables, model_structure(model, spec.input_shape)


@pytest.fixture(scope="session")
def abstract_model():
  """``name -> (model, spec, abstract variables, structure)``, cached per name."""
  return _abstract


def _fill(path, leaf, rng: np.random.Generator):
  collection, last = path[0].key, path[-1].key
  shape = leaf.shape
  if collection == "masks":
    value = np.ones(shape)
  elif collection == "quant":
    value = np.full(shape, FULL_PRECISION_BITS)
  elif last == "kernel":
    fan_in = int(np.prod(shape[:-1]))
    value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
  elif last in ("scale", "var"):
    value = rng.uniform(0.5, 1.5, size=shape)
  else:  # biases, BN shifts and means
    value = rng.normal(size=shape) * 0.1
  return jnp.asarray(value, leaf.dtype)


def random_variables(abstract_variables, seed: int = 0) -> dict:
  """Concrete variables of the given shapes: random params and BN stats, masks 1, 32 bits."""
  rng = np.random.default_rng(seed)
  filled = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _fill(path, leaf, rng), abstract_variables)
  return dict(filled)


@pytest.fixture(scope="session")
def random_vars():
  """``(abstract variables, seed) -> concrete random variables``."""
  return random_variables
