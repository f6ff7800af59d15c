"""Export: integer codes packed to their bit-widths, and a loaded model that gives
the fake-quantized model's logits.

Independent checks: hand-packed bytes, hand-worked grids (a symmetric grid through
zero, DoReFa's 2-bit levels), the fake-quantized model's own forward pass on real
CIFAR-10 images, and the file size against a byte count of the payload.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.compress.compact import compact
from picpq_jax.compress.export import (Prequantized, export, load_exported, pack_codes,
                                       unpack_codes, weight_codes)
from picpq_jax.errors import UserError
from picpq_jax.models import FullPrecision, get_model, model_structure
from tests.compress.test_compact import _images, _random_masks, _set_bits
from tests.models.conftest import random_variables


@pytest.fixture(scope="module")
def images(cache_dir):
  return _images(cache_dir)


@dataclasses.dataclass(frozen=True)
class MaxScaleQuantizer:
  """Symmetric uniform test quantizer: weights ``round(w / s) * s`` with
  ``s = max|w| / (2^(b-1) - 1)``; activations clipped to ``[0, a_clip]`` (a learnt
  scalar) on ``2^b - 1`` levels; identity at 32 bits."""

  def param_inits(self, kernel_shape):
    del kernel_shape
    return {"a_clip": (lambda key, shape: jnp.full(shape, 4.0, jnp.float32), ())}

  def weights(self, w, bits, qparams):
    del qparams
    s = jnp.max(jnp.abs(w)) / (jnp.exp2(bits.astype(jnp.float32) - 1) - 1)
    return jnp.where(bits >= 32, w, jnp.round(w / s) * s)

  def activations(self, x, bits, qparams):
    n, clip = jnp.exp2(bits.astype(jnp.float32)) - 1, qparams["a_clip"]
    return jnp.where(bits >= 32, x, jnp.round(jnp.clip(x, 0, clip) / clip * n) * clip / n)


def _quantized(name: str, quantizer, seed: int, bits: int = 4):
  """Model, random variables with every layer but the stem and head at ``bits``."""
  model = get_model(name, quantizer=quantizer)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = random_variables(jax.eval_shape(model.init, jax.random.key(0), x), seed)
  variables["params"] = _initial_qparams(variables["params"], quantizer)
  variables["quant"] = _set_bits(variables["quant"], bits, bits)
  return model, variables


def _initial_qparams(params, quantizer):
  """``params`` with each layer's quantizer parameters at the quantizer's own init."""
  if "kernel" in params:
    inits = quantizer.param_inits(tuple(params["kernel"].shape))
    return {k: inits[k][0](jax.random.key(0), inits[k][1]) if k in inits else v
            for k, v in params.items()}
  return {k: _initial_qparams(v, quantizer) if isinstance(v, dict) else v
          for k, v in params.items()}


def _logits(model, variables, x):
  return jax.jit(lambda v, x: model.apply(v, x))(variables, x)


# Packing and codes ----------------------------------------------------------------------


def test_pack_codes_hand_examples():
  # 2 bits, offset binary u = q + 2: -2 -1 0 1 -> 00 01 10 11 -> 0b00011011.
  np.testing.assert_array_equal(pack_codes(np.array([-2, -1, 0, 1]), 2), [0b00011011])
  # 3 bits: -4 3 0 -> u = 0 7 4 -> 000 111 100 -> 00011110 0(0000000).
  np.testing.assert_array_equal(pack_codes(np.array([-4, 3, 0]), 3), [0b00011110, 0])
  with pytest.raises(UserError, match="do not fit 3 bits"):
    pack_codes(np.array([4]), 3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 12])
def test_pack_unpack_round_trip(bits):
  rng = np.random.default_rng(bits)
  codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=1001)
  packed = pack_codes(codes, bits)
  assert packed.size == math.ceil(1001 * bits / 8)
  np.testing.assert_array_equal(unpack_codes(packed, bits, 1001), codes)


def test_weight_codes_grid_through_zero():
  wq = 0.25 * np.array([[-3.0, -1.0], [0.0, 2.0], [3.0, 3.0]], np.float32)
  codes, scale, half = weight_codes(wq, 3)
  assert (scale, half) == (0.25, 0.0)
  np.testing.assert_array_equal(codes, [[-3, -1], [0, 2], [3, 3]])


def test_weight_codes_dorefa_two_bit_levels():
  """DoReFa's 2-bit weights -1, -1/3, 1/3, 1 are (2/3) * (q + 1/2), q = -2..1."""
  wq = np.array([1.0, -1.0, 1 / 3, -1 / 3, 1 / 3], np.float32)
  codes, scale, half = weight_codes(wq, 2)
  assert half == 0.5 and scale == pytest.approx(2 / 3, rel=1e-6)
  np.testing.assert_array_equal(codes, [1, -2, 0, -1, 0])


def test_weight_codes_reject_weights_off_a_grid():
  with pytest.raises(UserError, match="do not fit 4 bits"):
    weight_codes(np.random.default_rng(0).normal(size=100).astype(np.float32), 4)
  with pytest.raises(UserError, match="more than 3 bits"):  # 4 levels, but codes -5..5
    weight_codes(np.array([-0.5, 0.0, 0.1, 0.5], np.float32), 3)


def test_prequantized_passes_weights_and_quantizes_activations():
  base = MaxScaleQuantizer()
  q = Prequantized(base)
  w, x, bits = jnp.array([0.3, -0.7]), jnp.array([0.1, 5.0, -1.0]), jnp.int32(2)
  qparams = {"a_clip": jnp.float32(3.0)}
  np.testing.assert_array_equal(q.weights(w, bits, qparams), w)
  np.testing.assert_allclose(q.activations(x, bits, qparams), [0.0, 3.0, 0.0])  # 0, 1, 2, 3
  assert q.param_inits((3, 3, 4, 8)).keys() == {"a_clip"}
  assert hash(q) == hash(Prequantized(base))


# Export and load ---------------------------------------------------------------------------


def test_export_resnet20_size_and_logits(tmp_path, images):
  """All convs but the stem at 4 bits: the file holds 4 bits per such weight."""
  quantizer = MaxScaleQuantizer()
  model, variables = _quantized("resnet20", quantizer, seed=0)
  path = tmp_path / "resnet20.npz"
  info = export(path, "resnet20", variables, quantizer)

  params = jax.tree_util.tree_leaves_with_path(variables["params"])
  packed = {jax.tree_util.keystr(p): v.size for p, v in params
            if p[-1].key == "kernel" and p[0].key not in ("stem_conv", "head")}
  assert len(packed) == 18 and len(info.packed_layers) == 18
  scalars = sum(v.size for v in jax.tree.leaves(variables))
  packed_bytes = sum(math.ceil(n * 4 / 8) for n in packed.values())
  payload = packed_bytes + 4 * (scalars - sum(packed.values()))
  assert info.float32_bytes == 4 * scalars
  assert payload <= info.file_bytes < payload + 40_000  # header and zip directory
  assert info.ratio < 0.2  # ~1/8 for the packed weights, float32 for the rest
  assert os.listdir(tmp_path) == ["resnet20.npz"]  # no temporary file left

  loaded_model, loaded = load_exported(path, quantizer=quantizer)
  assert loaded_model.quantizer == Prequantized(quantizer)
  kernel = variables["params"]["stage3_block2"]["conv2"]["kernel"]
  np.testing.assert_allclose(loaded["params"]["stage3_block2"]["conv2"]["kernel"],
                             quantizer.weights(kernel, jnp.int32(4), {}), atol=1e-6)
  np.testing.assert_array_equal(loaded["params"]["stem_conv"]["kernel"],
                                variables["params"]["stem_conv"]["kernel"])
  np.testing.assert_array_equal(loaded["batch_stats"]["stage1_block0"]["bn1"]["var"],
                                variables["batch_stats"]["stage1_block0"]["bn1"]["var"])
  assert loaded["quant"]["stage1_block0"]["conv1"]["w_bits"].dtype == jnp.int32
  assert jax.tree.map(int, loaded["quant"]) == jax.tree.map(int, variables["quant"])
  np.testing.assert_allclose(_logits(loaded_model, loaded, images),
                             _logits(model, variables, images), rtol=1e-4, atol=1e-4)


def test_export_compacted_model(tmp_path, images):
  """Compact a masked, quantized ResNet-8, export the small model, load it back."""
  quantizer = MaxScaleQuantizer()
  model, variables = _quantized("resnet8", quantizer, seed=1)
  structure = model_structure(model, (32, 32, 3))
  variables["masks"] = _random_masks(structure, seed=2)
  small, small_vars = compact(model, variables, structure)
  full_info = export(tmp_path / "full.npz", "resnet8", variables, quantizer)
  info = export(tmp_path / "small.npz", "resnet8", small_vars, quantizer, model=small)
  assert info.file_bytes < 0.75 * full_info.file_bytes
  loaded_model, loaded = load_exported(info.path, quantizer=quantizer)
  assert loaded_model.group_sizes == small.group_sizes
  assert loaded_model.shortcut_maps == small.shortcut_maps
  np.testing.assert_allclose(_logits(loaded_model, loaded, images),
                             _logits(small, small_vars, images), rtol=1e-4, atol=1e-4)
  with pytest.raises(UserError, match="do not fit the model"):
    export(tmp_path / "x.npz", "resnet8", small_vars, quantizer)  # model= missing


@pytest.mark.parametrize("name", ["DoReFa", "LSQ", "PACT"])
def test_export_library_quantizers(name, tmp_path, images):
  """With the library's quantizers (when present): rebuilt from the header by itself."""
  quantizers = pytest.importorskip("picpq_jax.compress.quantizers")
  quantizer = getattr(quantizers, name)()
  model, variables = _quantized("resnet8", quantizer, seed=3)
  info = export(tmp_path / "q.npz", "resnet8", variables, quantizer)
  assert info.ratio < 0.3
  loaded_model, loaded = load_exported(info.path)
  assert loaded_model.quantizer == Prequantized(quantizer)
  kernel = variables["params"]["stage2_block0"]["conv1"]["kernel"]
  qparams = {k: v for k, v in variables["params"]["stage2_block0"]["conv1"].items()
             if k != "kernel"}
  np.testing.assert_allclose(loaded["params"]["stage2_block0"]["conv1"]["kernel"],
                             quantizer.weights(kernel, jnp.int32(4), qparams), atol=1e-6)
  np.testing.assert_allclose(_logits(loaded_model, loaded, images),
                             _logits(model, variables, images), rtol=1e-4, atol=1e-4)


def test_failed_export_leaves_old_file_and_bad_input_raises(tmp_path):
  quantizer = MaxScaleQuantizer()
  _, variables = _quantized("resnet8", quantizer, seed=4)
  path = tmp_path / "model.npz"
  export(path, "resnet8", variables, quantizer)
  before = path.read_bytes()
  # Unquantized weights at 4 bits are not on any grid: nothing is written.
  unquantized = Prequantized(quantizer)
  with pytest.raises(UserError, match="do not fit 4 bits"):
    export(path, "resnet8", variables, unquantized,
           model=get_model("resnet8", quantizer=unquantized))
  with pytest.raises(UserError, match="quantizer"):
    export(path, "resnet8", variables, FullPrecision(),
           model=get_model("resnet8", quantizer=quantizer))
  assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.npz"]
  with pytest.raises(UserError, match="does not exist"):
    export(tmp_path / "missing" / "m.npz", "resnet8", variables, quantizer)
  with pytest.raises(UserError, match="pass quantizer="):
    load_exported(path)  # a test quantizer is not rebuilt from the header
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(UserError, match="cannot read"):
    load_exported(tmp_path / "junk.npz")
