"""A training-mode apply updates the BN statistics and returns logits of the right shape."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.models import MODELS, get_model

# Run for real, one per architecture family (ResNet-18 on 64x64: it is fully
# convolutional up to its global pool); the deeper CIFAR ResNets share resnet20's
# code and are checked abstractly.
REAL_INPUTS = {"resnet20": None, "vgg16": None, "mobilenetv2": None, "resnet18": (64, 64, 3)}


@pytest.mark.parametrize("name", sorted(REAL_INPUTS))
def test_train_step_updates_batch_stats(name, abstract_model, random_vars):
  model, spec, abstract, _ = abstract_model(name)
  variables = random_vars(abstract, seed=0)
  shape = REAL_INPUTS[name] or spec.input_shape
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *shape)), jnp.float32)
  apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))

  logits, updates = apply(variables, x)

  assert logits.shape == (2, spec.num_classes) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert set(updates) == {"batch_stats"}
  old, new = variables["batch_stats"], updates["batch_stats"]
  assert jax.tree.structure(new) == jax.tree.structure(old)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(old)[0], jax.tree.leaves(new)):
    assert a.shape == b.shape and not np.allclose(a, b), jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", sorted(set(MODELS) - set(REAL_INPUTS)))
def test_train_step_shapes(name, abstract_model):
  model, spec, abstract, _ = abstract_model(name)
  x = jax.ShapeDtypeStruct((2, *spec.input_shape), jnp.float32)
  logits, updates = jax.eval_shape(
      functools.partial(model.apply, train=True, mutable=["batch_stats"]), abstract, x)
  assert logits.shape == (2, spec.num_classes)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(abstract["batch_stats"])


def test_num_classes_override():
  model = get_model("vgg16", num_classes=100)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert jax.eval_shape(model.apply, variables, x).shape == (1, 100)
