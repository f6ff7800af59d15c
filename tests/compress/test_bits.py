"""Bit-width assignment against a NumPy transcription of DESIGN 5 on hand-picked masks.

``bits = max_bits - ceil(penalty / sparsity)`` for a layer that lost channels, where
``sparsity = sum|W[..., kept_in, kept_out]| / sum|W|`` of its original HWIO kernel;
clamped to 2; full-precision layers (the stem, the classifier) stay at 32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from picpq_jax.compress import bits as bits_lib
from picpq_jax.errors import UserError
from picpq_jax.models import get_model, get_spec, model_structure

RESNET20_MAX_BITS = [32] + [8] * 6 + [6] * 6 + [4] * 6


@functools.cache
def _model(name: str):
  """(structure, random NumPy params, abstract quant) of a registry model."""
  spec, model = get_spec(name), get_model(name)
  x = jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract["params"])
  return model_structure(model, spec.input_shape), params, abstract["quant"]


def ones(structure):
  return {g.name: np.ones(g.size, np.float32) for g in structure.groups}


def np_bits(kernel, keep_in, keep_out, max_bits, penalty=1 / 6):
  """DESIGN 5 for one layer whose kept input / output channels are given (index arrays)."""
  w = np.abs(kernel.astype(np.float64))
  sparsity = w[:, :, keep_in][:, :, :, keep_out].sum() / w.sum()
  return max(2, max_bits - math.ceil(penalty / sparsity))


def flat_bits(quant) -> dict[str, int]:
  flat = traverse_util.flatten_dict(quant, sep="/")
  w = {k[:-len("/w_bits")]: int(v) for k, v in flat.items() if k.endswith("/w_bits")}
  a = {k[:-len("/a_bits")]: int(v) for k, v in flat.items() if k.endswith("/a_bits")}
  assert w == a  # weights and activations share the bit-width
  return w


def test_resnet20_hand_example():
  structure, params, _ = _model("resnet20")
  masks = ones(structure)
  masks["stage2_block1_mid"][16:] = 0.0  # half of a block's inner channels
  masks["stage3"][4:] = 0.0  # 4 of 64 left in the coupled stream: the clamp at 2 bits
  got = flat_bits(bits_lib.assign_bits(structure, params, masks, RESNET20_MAX_BITS))

  k = lambda name: params[name.split("/")[0]][name.split("/")[1]]["kernel"]
  half, all32, four, all64 = np.arange(16), np.arange(32), np.arange(4), np.arange(64)
  want = {
      "stage2_block1/conv1": np_bits(k("stage2_block1/conv1"), all32, half, 6),  # writer
      "stage2_block1/conv2": np_bits(k("stage2_block1/conv2"), half, all32, 6),  # reader
      "stage3_block0/conv2": np_bits(k("stage3_block0/conv2"), all64, four, 4),
      "stage3_block1/conv1": np_bits(k("stage3_block1/conv1"), four, all64, 4),
      "stage3_block1/conv2": np_bits(k("stage3_block1/conv2"), all64, four, 4),
      "stage3_block2/conv1": np_bits(k("stage3_block2/conv1"), four, all64, 4),
      "stage3_block2/conv2": np_bits(k("stage3_block2/conv2"), all64, four, 4),
  }
  assert want["stage2_block1/conv1"] == 5 and want["stage3_block0/conv2"] == 2  # the example bites
  convs = [l.name for l in bits_lib.prunable_convs(structure)]
  for name, max_bits in zip(convs, RESNET20_MAX_BITS):
    assert got[name] == want.get(name, max_bits), name  # every other conv keeps its max
  assert got["head"] == 32  # the classifier stays full precision although it lost inputs


def test_unpruned_keeps_max_bits_in_the_models_quant_layout():
  structure, params, abstract_quant = _model("resnet20")
  quant = bits_lib.assign_bits(structure, params, ones(structure), RESNET20_MAX_BITS)
  assert (jax.tree.structure(quant) == jax.tree.structure(abstract_quant))
  assert all(leaf.dtype == jnp.int32 and leaf.shape == () for leaf in jax.tree.leaves(quant))
  got = flat_bits(quant)
  convs = [l.name for l in bits_lib.prunable_convs(structure)]
  assert [got[n] for n in convs] == RESNET20_MAX_BITS and got["head"] == 32


def test_pruned_first_conv_stays_full_precision():
  structure, params, _ = _model("resnet20")
  masks = ones(structure)
  masks["stage1"][8:] = 0.0  # the stem's outputs
  got = flat_bits(bits_lib.assign_bits(structure, params, masks, RESNET20_MAX_BITS))
  assert got["stem_conv"] == 32
  assert got["stage1_block0/conv1"] < 8  # its readers are quantized layers and do lose bits


def test_depthwise_sparsity_follows_the_group():
  structure, params, _ = _model("mobilenetv2")
  masks = ones(structure)
  masks["stage2_block0_expand"][::3] = 0.0  # 64 of 96 kept
  sparsity, lost = jax.jit(bits_lib.layer_sparsity, static_argnums=0)(structure, params, masks)
  index = {l.name: i for i, l in enumerate(bits_lib.prunable_convs(structure))}
  keep = np.flatnonzero(masks["stage2_block0_expand"])
  w = np.abs(params["stage2_block0"]["dw_conv"]["kernel"].astype(np.float64))  # [3, 3, 1, 96]
  np.testing.assert_allclose(float(sparsity[index["stage2_block0/dw_conv"]]),
                             w[..., keep].sum() / w.sum(), rtol=1e-5)
  w = np.abs(params["stage2_block0"]["project_conv"]["kernel"].astype(np.float64))  # [1,1,96,24]
  np.testing.assert_allclose(float(sparsity[index["stage2_block0/project_conv"]]),
                             w[:, :, keep].sum() / w.sum(), rtol=1e-5)
  assert bool(lost[index["stage2_block0/expand_conv"]])
  assert not bool(lost[index["stage3_block0/expand_conv"]])


def test_no_recompile_for_new_masks():
  structure, params, _ = _model("resnet20")
  traces = []

  def assign(masks):
    traces.append(1)
    return bits_lib.assign_bits(structure, params, masks, RESNET20_MAX_BITS)

  assign = jax.jit(assign)
  rng = np.random.default_rng(1)
  results = []
  for keep in (0.9, 0.3):
    masks = {g.name: (rng.random(g.size) < keep).astype(np.float32) for g in structure.groups}
    results.append(flat_bits(assign(masks)))
  assert len(traces) == 1
  assert results[0] != results[1]


def test_reference_max_bits():
  structure, _, _ = _model("resnet20")
  assert list(bits_lib.reference_max_bits("resnet20", structure)) == RESNET20_MAX_BITS
  resnet56 = model_structure(get_model("resnet56"), (32, 32, 3))
  assert list(bits_lib.reference_max_bits("resnet56", resnet56)) == (
      [32] + [8] * 18 + [6] * 18 + [4] * 18)
  with pytest.raises(UserError, match="published max_bits of vgg16"):
    bits_lib.reference_max_bits("vgg16", structure)


def test_bad_input_raises_user_error():
  structure, params, _ = _model("resnet20")
  with pytest.raises(UserError, match="19 prunable convs"):
    bits_lib.assign_bits(structure, params, ones(structure), RESNET20_MAX_BITS[:-1])
  with pytest.raises(UserError, match="penalty"):
    bits_lib.assign_bits(structure, params, ones(structure), RESNET20_MAX_BITS, 0.0)
  with pytest.raises(UserError, match="integers >= 1"):
    bits_lib.assign_bits(structure, params, ones(structure), [0] + RESNET20_MAX_BITS[1:])


def test_uniform_bits_quantizes_every_quantized_conv_alike():
  from picpq_jax.compress.bits import uniform_bits
  structure, _, _ = _model("resnet20")
  bits = flat_bits(uniform_bits(structure, 5, RESNET20_MAX_BITS))
  assert bits["stem_conv"] == 32 and bits["head"] == 32
  convs = [l.name for l in structure.layers if l.kind == "conv" and l.name != "stem_conv"]
  assert len(convs) == 18 and all(bits[n] == 5 for n in convs)
  with pytest.raises(UserError, match="uniform bits"):
    uniform_bits(structure, 32, RESNET20_MAX_BITS)
