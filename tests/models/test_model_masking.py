"""A zero in a group's mask removes that channel: it reads as zero everywhere the
group is consumed, and nothing its writers compute for it reaches the logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.models import QConv, QDense

CHANNEL = 3
CASES = [
    ("resnet20", "stage1"),  # written by the stem and six conv2s
    ("resnet20", "stage2_block1_mid"),
    ("resnet20", "stage3"),
    ("mobilenetv2", "stem"),  # also filtered by stage 1's depthwise conv
    ("mobilenetv2", "stage3_block1_expand"),  # expand conv, then depthwise
    ("mobilenetv2", "stage4"),  # coupled stream
    ("mobilenetv2", "last"),
    ("vgg16", "conv13"),  # read by the classifier's linear1
    ("resnet18", "stage2"),  # written by the shortcut conv and two conv2s
]
# Smaller than the model's own input (ResNet-18 is fully convolutional).
INPUT_SHAPES = {"resnet18": (64, 64, 3)}

_forwards = {}


def _forward(name, model):
  """Jitted ``(variables, x) -> (logits, {layer: its input})``, one per model."""
  if name not in _forwards:
    def forward(variables, x):
      inputs = {}

      def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, (QConv, QDense)):
          inputs["/".join(context.module.path)] = args[0]
        return next_fun(*args, **kwargs)

      with nn.intercept_methods(record):
        logits = model.apply(variables, x, train=False)
      return logits, inputs

    _forwards[name] = jax.jit(forward)
  return _forwards[name]


def _at(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _set(tree, path, leaf, value):
  """A copy of ``tree`` with ``tree[path][leaf][..., CHANNEL] = value``."""
  tree = jax.tree.map(lambda a: a, tree)  # fresh containers, shared leaves
  node = _at(tree, path)
  node[leaf] = node[leaf].at[..., CHANNEL].set(value)
  return tree


def _alter_writers(variables, writers, rng):
  """Arbitrary new kernel slice, bias, BN scale/shift and statistics for ``CHANNEL``."""
  params, stats = variables["params"], variables["batch_stats"]
  for w in writers:
    kernel = _at(params, w)["kernel"]
    params = _set(params, w, "kernel", 5.0 * rng.normal(size=kernel.shape[:-1]))
    if "bias" in _at(params, w):
      params = _set(params, w, "bias", 7.0)
    parent, last = w.rpartition("/")[0], w.rpartition("/")[2]
    bn = "/".join(filter(None, [parent, last.replace("conv", "bn")]))
    params = _set(params, bn, "scale", 3.0)  # BN(0) = (0 + 2) / 0.1 * 3 + 11 = 71
    params = _set(params, bn, "bias", 11.0)
    stats = _set(stats, bn, "mean", -2.0)
    stats = _set(stats, bn, "var", 0.01)
  return {**variables, "params": params, "batch_stats": stats}


@pytest.mark.parametrize("name,group", CASES)
def test_masked_channel_is_zero_and_has_no_influence(name, group, abstract_model, random_vars):
  model, spec, abstract, structure = abstract_model(name)
  variables = random_vars(abstract, seed=1)
  forward = _forward(name, model)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, *INPUT_SHAPES.get(name, spec.input_shape))), jnp.float32)
  info = structure.group(group)
  altered = _alter_writers(variables, info.writers, np.random.default_rng(3))

  masks = dict(variables["masks"])
  masks[group] = masks[group].at[CHANNEL].set(0.0)
  logits, inputs = forward({**variables, "masks": masks}, x)
  for reader in info.readers:
    assert np.all(np.asarray(inputs[reader])[..., CHANNEL] == 0.0), reader
    assert np.any(np.asarray(inputs[reader]) != 0.0), reader
  altered_logits, _ = forward({**altered, "masks": masks}, x)
  np.testing.assert_allclose(altered_logits, logits, rtol=0, atol=1e-5)

  # Control: unmasked, the same alteration does change the logits.
  unmasked, _ = forward(variables, x)
  altered_unmasked, _ = forward(altered, x)
  assert np.max(np.abs(altered_unmasked - unmasked)) > 1e-3
