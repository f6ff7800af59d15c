"""Cost model against published figures and hand computations.

Every expected number is written out from the architecture (widths, spatial sizes,
kernel sizes), not read from the code under test: MACs ``h*w*c_in*c_out*k*k`` per
conv (depthwise: ``h*w*k*k*c``), parameters = kernels and biases (no BN), BOPs =
MACs * w_bits * a_bits per conv and params * w_bits * a_bits for the classifier.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from picpq_jax.compress import cost_model as cost_lib
from picpq_jax.errors import UserError
from picpq_jax.models import get_model, get_spec, model_structure


@functools.cache
def _model(name: str):
  """(structure, abstract variables) of a registry model; nothing is computed."""
  spec, model = get_spec(name), get_model(name)
  x = jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32)
  return model_structure(model, spec.input_shape), jax.eval_shape(model.init, jax.random.key(0), x)


def quant_with(name: str, bits: dict[str, int], default: int = 32) -> dict:
  """The model's real ``quant`` collection with ``bits[layer]`` (w and a) or ``default``."""
  _, variables = _model(name)
  flat = traverse_util.flatten_dict(variables["quant"], sep="/")
  out = {k: jnp.int32(bits.get(k.rsplit("/", 1)[0], default)) for k in flat}
  return traverse_util.unflatten_dict(out, sep="/")


def cifar_resnet_layers(depth: int) -> dict[str, tuple[int, int, int]]:
  """ResNet-(6n+2) by hand: conv name -> (output pixels per side, c_in, c_out), 3x3 each."""
  n = (depth - 2) // 6
  layers = {"stem_conv": (32, 3, 16)}
  c_prev = 16
  for s, (hw, c) in enumerate(((32, 16), (16, 32), (8, 64))):
    for b in range(n):
      layers[f"stage{s + 1}_block{b}/conv1"] = (hw, c_prev if b == 0 else c, c)
      layers[f"stage{s + 1}_block{b}/conv2"] = (hw, c, c)
    c_prev = c
  return layers


def hand_costs(layers: dict[str, tuple[int, int, int]], bits: dict[str, int],
               head_in: int = 64, classes: int = 10) -> tuple[int, int, int]:
  """(MACs, params, BOPs) of 3x3 convs without bias plus a ``head_in -> classes`` classifier."""
  macs = params = bops = 0
  for name, (hw, c_in, c_out) in layers.items():
    m = hw * hw * c_in * c_out * 9
    macs, params, bops = macs + m, params + 9 * c_in * c_out, bops + m * bits.get(name, 32) ** 2
  head_params = head_in * classes + classes
  return macs + head_in * classes, params + head_params, bops + head_params * 32 * 32


@pytest.mark.parametrize("name,depth,published", [
    ("resnet20", 20, 40_551_040), ("resnet56", 56, 125_485_696)])
def test_unpruned_full_precision_matches_published(name, depth, published):
  structure, _ = _model(name)
  macs, params, bops = hand_costs(cifar_resnet_layers(depth), {})
  assert macs == published
  c = cost_lib.full_cost(structure)
  np.testing.assert_allclose(float(c.macs), published, rtol=1e-6)
  np.testing.assert_allclose(float(c.flops), published, rtol=1e-6)  # paper: FLOPs = MACs
  np.testing.assert_allclose(float(c.mul_add_flops), 2 * published, rtol=1e-6)
  np.testing.assert_allclose(float(c.params), params, rtol=1e-6)
  # Convs: 32*32*MACs; classifier: its 650 params (weights + biases) * 32 * 32.
  np.testing.assert_allclose(float(c.bops), 1024 * (published - 640 + 650), rtol=1e-6)
  np.testing.assert_allclose(float(c.bops), bops, rtol=1e-6)


def test_pruned_mixed_bits_resnet56_by_hand():
  """5 channels off stage1_block0_mid, 8 off the coupled stage2 stream, mixed 4/6/8 bits."""
  structure, _ = _model("resnet56")
  masks = cost_lib.full_masks(structure)
  masks["stage1_block0_mid"] = masks["stage1_block0_mid"].at[jnp.array([0, 3, 7, 8, 15])].set(0.0)
  masks["stage2"] = masks["stage2"].at[jnp.arange(0, 32, 4)].set(0.0)  # 8 of 32
  bits = {"stage1_block0/conv1": 4, "stage1_block0/conv2": 6, "stage2_block0/conv2": 8,
          "stage2_block4/conv1": 6, "stage3_block0/conv1": 4}

  layers = cifar_resnet_layers(56)
  layers["stage1_block0/conv1"] = (32, 16, 11)  # writer of the mid group loses 5 outputs
  layers["stage1_block0/conv2"] = (32, 11, 16)  # its reader loses 5 inputs
  for b in range(9):
    hw, c_in, _ = layers[f"stage2_block{b}/conv2"]
    layers[f"stage2_block{b}/conv2"] = (hw, c_in, 24)  # every writer of the stream: 24 outputs
  for b in range(1, 9):
    layers[f"stage2_block{b}/conv1"] = (16, 24, 32)  # readers of the stream: 24 inputs
  layers["stage3_block0/conv1"] = (8, 24, 64)  # the next stage's first conv reads it too
  # stage2_block0/conv1 reads stage1 (unchanged); the option-A shortcut has no conv.
  assert not any("downsample" in l.name for l in structure.layers)
  macs, params, bops = hand_costs(layers, bits)

  quant = quant_with("resnet56", bits)
  c = jax.jit(cost_lib.cost, static_argnums=0)(structure, masks, quant)
  np.testing.assert_allclose([float(c.macs), float(c.params), float(c.bops)],
                             [macs, params, bops], rtol=1e-6)
  per_layer = cost_lib.layer_costs(structure, masks, quant)
  index = {l.name: i for i, l in enumerate(structure.layers)}
  for name in ("stage1_block0/conv2", "stage2_block4/conv1", "stage3_block0/conv1"):
    hw, c_in, c_out = layers[name]
    i = index[name]
    assert (float(per_layer.c_in[i]), float(per_layer.c_out[i])) == (c_in, c_out)
    assert float(per_layer.macs[i]) == hw * hw * c_in * c_out * 9
    assert float(per_layer.bops[i]) == hw * hw * c_in * c_out * 9 * bits[name] ** 2


def test_mobilenetv2_depthwise_follows_its_producer():
  structure, _ = _model("mobilenetv2")
  masks = cost_lib.full_masks(structure)
  masks["stem"] = masks["stem"].at[:4].set(0.0)  # 28 of 32: the t=1 block filters it
  masks["stage2_block0_expand"] = masks["stage2_block0_expand"].at[86:].set(0.0)  # 86 of 96
  costs = cost_lib.layer_costs(structure, masks)
  index = {l.name: i for i, l in enumerate(structure.layers)}
  expected = {  # name -> (MACs, params) at 32x32 (strides 1 up to stage 3)
      "stem_conv": (32 * 32 * 3 * 28 * 9, 3 * 28 * 9),
      "stage1_block0/dw_conv": (32 * 32 * 28 * 9, 28 * 9),
      "stage1_block0/project_conv": (32 * 32 * 28 * 16, 28 * 16),
      "stage2_block0/expand_conv": (32 * 32 * 16 * 86, 16 * 86),
      "stage2_block0/dw_conv": (32 * 32 * 86 * 9, 86 * 9),
      "stage2_block0/project_conv": (32 * 32 * 86 * 24, 86 * 24),
  }
  for name, (macs, params) in expected.items():
    assert float(costs.macs[index[name]]) == macs, name
    assert float(costs.params[index[name]]) == params, name
  unpruned = cost_lib.layer_costs(structure, cost_lib.full_masks(structure))
  removed = sum(float(unpruned.macs[index[n]] - costs.macs[index[n]]) for n in expected)
  np.testing.assert_allclose(float(cost_lib.full_cost(structure).macs - jnp.sum(costs.macs)),
                             removed, rtol=1e-5)


def np_macs(structure, masks) -> float:
  """MACs in float64 from the layer table: kept counts times the static sizes."""
  total = 0.0
  for l in structure.layers:
    c_in = masks[l.in_group].sum() if l.in_group else l.in_features
    c_out = masks[l.out_group].sum() if l.out_group else l.out_features
    per_out = 1 if l.depthwise else c_in / l.feature_group_count
    total += l.out_hw[0] * l.out_hw[1] * l.kernel_size[0] * l.kernel_size[1] * per_out * c_out
  return total


def test_jit_vmap_over_masks_without_recompiling():
  structure, _ = _model("resnet20")
  rng = np.random.default_rng(0)
  traces = []

  def macs(masks):
    traces.append(1)
    return cost_lib.cost(structure, masks).macs

  batched = jax.jit(jax.vmap(macs))
  for _ in range(2):
    np_masks = {g.name: (rng.random((4, g.size)) < 0.6).astype(np.float32)
                for g in structure.groups}
    got = batched({k: jnp.asarray(v) for k, v in np_masks.items()})
    want = [np_macs(structure, {k: v[i] for k, v in np_masks.items()}) for i in range(4)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  assert len(traces) == 1


def test_compression_ratios_uniform_bits():
  structure, _ = _model("resnet20")
  quant = quant_with("resnet20", {}, default=8)  # every layer, classifier too, at 8 bits
  r = cost_lib.compression_ratios(structure, cost_lib.full_masks(structure), quant)
  np.testing.assert_allclose([float(r.macs), float(r.params), float(r.bops)], [1, 1, 16],
                             rtol=1e-6)


def test_bad_input_raises_user_error():
  structure, _ = _model("resnet20")
  masks = cost_lib.full_masks(structure)
  with pytest.raises(UserError, match="masks lack"):
    cost_lib.cost(structure, {k: v for k, v in masks.items() if k != "stage2"})
  quant = traverse_util.flatten_dict(quant_with("resnet20", {}), sep="/")
  quant.pop("head/w_bits")
  with pytest.raises(UserError, match="quant lacks"):
    cost_lib.cost(structure, masks, traverse_util.unflatten_dict(quant, sep="/"))
  with pytest.raises(UserError, match="unknown cost metric"):
    cost_lib.full_cost(structure).metric("latency")
