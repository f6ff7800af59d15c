"""Compaction: the small dense model computes the masked model's logits.

Independent checks: the masked full model's own forward pass on real CIFAR-10
images (pruned channels zeroed by its masks), hand counts of MACs and parameters
from the kept channel counts, and a hand-worked option-A shortcut map.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax.compress.compact import (compact, kept_channels, pad_channels,
                                        zero_pruned_weights)
from picpq_jax.data import channel_stats, load_embedded, normalize
from picpq_jax.errors import UserError
from picpq_jax.models import CifarResNet, get_model, model_structure, param_count
from tests.models.conftest import random_variables


@functools.cache
def _images(cache_dir: str) -> jax.Array:
  """8 real CIFAR-10 images (one from each of 8 classes), normalized: [8, 32, 32, 3]."""
  data = load_embedded(cache_dir)
  mean, std = channel_stats(data.images)
  return normalize(data.images[::625][:8], mean, std)


@pytest.fixture(scope="module")
def images(cache_dir):
  return _images(cache_dir)


def _random_masks(structure, seed: int, keep: float = 0.6) -> dict:
  """Each group keeps a random ~``keep`` of its channels, at least 2, at most C - 1."""
  rng = np.random.default_rng(seed)
  masks = {}
  for g in structure.groups:
    mask = (rng.random(g.size) < keep).astype(np.float32)
    mask[rng.choice(g.size, 2, replace=False)] = 1
    if mask.all():
      mask[rng.choice(np.flatnonzero(mask)[2:])] = 0
    masks[g.name] = jnp.asarray(mask)
  return masks


def _setup(model, input_shape, seed: int):
  """Model, random variables (BN statistics included), structure."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = random_variables(jax.eval_shape(model.init, jax.random.key(0), x), seed)
  return variables, model_structure(model, input_shape)


@functools.cache
def _compacted(name: str, seed: int = 0):
  """(model, masked variables, structure, small model, small variables, kept counts),
  on 32x32 inputs (ResNet-18 too: it is fully convolutional)."""
  model = get_model(name, num_classes=10)
  variables, structure = _setup(model, (32, 32, 3), seed)
  variables["masks"] = _random_masks(structure, seed + 1)
  small, small_vars = compact(model, variables, structure)
  kept = {g: int(np.asarray(m).sum()) for g, m in variables["masks"].items()}
  return model, variables, structure, small, small_vars, kept


@functools.cache
def _jitted_apply(model, train: bool):
  if train:
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  return jax.jit(lambda v, x: model.apply(v, x))


def _logits(model, variables, x, train: bool = False):
  """Eval-mode logits ``[N, classes]`` (train: ``(logits, new batch_stats)``), one
  compile per model."""
  return _jitted_apply(model, train)(variables, x)


# Hand counts -------------------------------------------------------------------------


def cifar_resnet_counts(depth: int, kept: dict, classes: int = 10) -> tuple[int, int]:
  """(MACs, params) of a CIFAR ResNet with ``kept[group]`` channels per group.

  Stem 3x3 at 32 px; per block conv1 (in -> mid) and conv2 (mid -> stream) at
  32/16/8 px, BN (2 params per channel) after each conv; head with bias.
  """
  n = (depth - 2) // 6
  macs, params = 32 * 32 * 9 * 3 * kept["stage1"], 27 * kept["stage1"] + 2 * kept["stage1"]
  cin = kept["stage1"]
  for s, hw in enumerate((32, 16, 8)):
    for b in range(n):
      mid, out = kept[f"stage{s + 1}_block{b}_mid"], kept[f"stage{s + 1}"]
      macs += hw * hw * 9 * (cin * mid + mid * out)
      params += 9 * (cin * mid + mid * out) + 2 * (mid + out)
      cin = out
  return macs + cin * classes, params + cin * classes + classes


def vgg16_counts(kept: dict, classes: int = 10) -> tuple[int, int]:
  """(MACs, params) of VGG-16-BN with ``kept["conv{i}"]`` channels.

  Convs with bias and BN at 32/16/8/4/2 px; linear1 512 wide with BN1d; head.
  """
  hw_of = [32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
  macs = params = 0
  cin = 3
  for i, hw in enumerate(hw_of, start=1):
    c = kept[f"conv{i}"]
    macs += hw * hw * 9 * cin * c
    params += 9 * cin * c + c + 2 * c
    cin = c
  macs += cin * 512 + 512 * classes
  params += cin * 512 + 512 + 2 * 512 + 512 * classes + classes
  return macs, params


def layer_counts(structure, kept: dict) -> tuple[int, int]:
  """(MACs, params) from the full model's layer list, every conv followed by BN:
  ``out_h * out_w * k * k * c_in_kept * c_out_kept`` (``c_in`` 1 for depthwise)."""
  macs = params = 0
  for l in structure.layers:
    cout = kept.get(l.out_group, l.out_features)
    cin = 1 if l.depthwise else kept.get(l.in_group, l.in_features)
    kk = l.kernel_size[0] * l.kernel_size[1]
    macs += l.out_hw[0] * l.out_hw[1] * kk * cin * cout
    params += kk * cin * cout + (cout if l.use_bias else 0) + (2 * cout if l.kind == "conv" else 0)
  return macs, params


# Logits -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "mobilenetv2", "resnet18"])
def test_compacted_logits_equal_masked_logits(name, images):
  model, variables, _, small, small_vars, _ = _compacted(name)
  assert all(np.asarray(m).min() == 0 for m in variables["masks"].values())  # all pruned
  expected = _logits(model, variables, images)
  got = _logits(small, small_vars, images)
  assert got.shape == (8, 10)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(expected)).max() > 0.1  # not trivially zero


def test_train_mode_logits_and_batch_stats(images):
  """Batch statistics are per channel, so training mode agrees too."""
  model, variables, _, small, small_vars, _ = _compacted("resnet20")
  (expected, full_stats), (got, small_stats) = (
      _logits(model, variables, images, train=True),
      _logits(small, small_vars, images, train=True))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  kept = np.flatnonzero(np.asarray(variables["masks"]["stage2_block1_mid"]))
  full_var = np.asarray(full_stats["batch_stats"]["stage2_block1"]["bn1"]["var"])
  np.testing.assert_allclose(small_stats["batch_stats"]["stage2_block1"]["bn1"]["var"],
                             full_var[kept], rtol=1e-4, atol=1e-5)


def test_slices_are_the_kept_channels():
  """A kernel keeps [.., in kept, out kept]; BN and biases keep their group's channels."""
  _, variables, _, _, small_vars, _ = _compacted("vgg16")
  masks = variables["masks"]
  k2, k3 = (np.flatnonzero(np.asarray(masks[g])) for g in ("conv2", "conv3"))
  full = np.asarray(variables["params"]["layer3"]["conv"]["kernel"])
  np.testing.assert_array_equal(small_vars["params"]["layer3"]["conv"]["kernel"],
                                full[:, :, k2][..., k3])
  np.testing.assert_array_equal(small_vars["batch_stats"]["layer3"]["bn"]["mean"],
                                np.asarray(variables["batch_stats"]["layer3"]["bn"]["mean"])[k3])
  np.testing.assert_array_equal(small_vars["params"]["layer3"]["conv"]["bias"],
                                np.asarray(variables["params"]["layer3"]["conv"]["bias"])[k3])
  for g, m in small_vars["masks"].items():
    np.testing.assert_array_equal(m, np.ones(int(np.asarray(masks[g]).sum())))


# MACs and parameters -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "mobilenetv2", "resnet18"])
def test_macs_and_params_match_hand_count(name):
  model, variables, structure, small, small_vars, kept = _compacted(name)
  counts = {"resnet20": functools.partial(cifar_resnet_counts, 20), "vgg16": vgg16_counts,
            "mobilenetv2": functools.partial(layer_counts, structure),
            "resnet18": functools.partial(layer_counts, structure)}[name]
  macs, params = counts(kept)
  small_structure = model_structure(small, (32, 32, 3))
  assert small_structure.macs == macs
  assert param_count(small_vars["params"]) == params
  assert params < 0.7 * param_count(variables["params"])
  if name in ("mobilenetv2", "resnet18"):  # the generic count agrees with the unpruned model's
    assert layer_counts(structure, {g.name: g.size for g in structure.groups})[0] == structure.macs


def test_resnet56_shapes_macs_and_params():
  """Abstract level only (no forward pass): shapes, MACs and parameters of ResNet-56."""
  model = get_model("resnet56")
  variables, structure = _setup(model, (32, 32, 3), seed=3)
  variables["masks"] = _random_masks(structure, seed=4, keep=0.5)
  small, small_vars = compact(model, variables, structure)
  kept = {g: int(np.asarray(m).sum()) for g, m in variables["masks"].items()}
  macs, params = cifar_resnet_counts(56, kept)
  assert model_structure(small, (32, 32, 3)).macs == macs
  assert param_count(small_vars["params"]) == params
  abstract = jax.eval_shape(small.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, small_vars)


# Identity, shortcut maps, composition -------------------------------------------------------


def test_unpruned_model_compacts_to_itself(images):
  model, variables, structure, *_ = _compacted("resnet20")
  variables = {**variables, "masks": jax.tree.map(jnp.ones_like, variables["masks"])}
  small, small_vars = compact(model, variables, structure)
  assert jax.tree.map(jnp.shape, small_vars) == jax.tree.map(jnp.shape, variables)
  assert dict(small.group_sizes) == {g.name: g.size for g in structure.groups}
  # Option A for 16 -> 32 and 32 -> 64 channels: target j reads source j - C_s / 2.
  assert small.shortcut_maps == tuple(
      tuple(j - c // 2 if c // 2 <= j < c // 2 + c else -1 for j in range(2 * c)) for c in (16, 32))
  np.testing.assert_allclose(_logits(small, small_vars, images),
                             _logits(model, variables, images), rtol=1e-5, atol=1e-5)


def test_default_shortcut_couplings_are_option_a():
  (first, second) = get_model("resnet20").shortcut_couplings()
  assert (first.source, first.target, second.source, second.target) == (
      "stage1", "stage2", "stage2", "stage3")
  assert first.index == (-1,) * 8 + tuple(range(16)) + (-1,) * 8


def _tiny():
  """ResNet-8 with widths 4/8/16: stage1 (4) -> stage2 (8) pads 2 on the left."""
  return CifarResNet(depth=8, widths=(4, 8, 16))


def test_shortcut_map_hand_example(images):
  """stage1 keeps {0, 2, 3}, stage2 keeps {1, 2, 4, 5, 6}. Full map: target t reads
  source t - 2. Small targets (1, 2, 4, 5, 6) read sources (-, 0, 2, 3, -), which sit
  at small positions (-1, 0, 1, 2, -1)."""
  model = _tiny()
  variables, structure = _setup(model, (32, 32, 3), seed=5)
  masks = {g: np.ones(s, np.float32) for g, s in ((g.name, g.size) for g in structure.groups)}
  masks["stage1"] = np.array([1, 0, 1, 1], np.float32)
  masks["stage2"] = np.array([0, 1, 1, 0, 1, 1, 1, 0], np.float32)
  masks["stage3"][::3] = 0
  variables["masks"] = jax.tree.map(jnp.asarray, masks)
  small, small_vars = compact(model, variables, structure)
  assert small.shortcut_maps[0] == (-1, 0, 1, 2, -1)
  np.testing.assert_allclose(_logits(small, small_vars, images),
                             _logits(model, variables, images), rtol=1e-4, atol=1e-4)


def test_compacting_twice_equals_masking_both_times(images):
  """Prune, compact, prune the small model again, compact: the logits are those of
  the full model masked with both masks combined (shortcut maps compose)."""
  model = _tiny()
  variables, structure = _setup(model, (32, 32, 3), seed=6)
  first = _random_masks(structure, seed=7, keep=0.8)
  small, small_vars = compact(model, {**variables, "masks": first}, structure)
  small_structure = model_structure(small, (32, 32, 3))
  second = _random_masks(small_structure, seed=8, keep=0.7)
  tiny, tiny_vars = compact(small, {**small_vars, "masks": second}, small_structure)
  both = {}
  for g, m in first.items():
    m = np.asarray(m).copy()
    m[np.flatnonzero(m)] = np.asarray(second[g])
    both[g] = jnp.asarray(m)
  np.testing.assert_allclose(_logits(tiny, tiny_vars, images),
                             _logits(model, {**variables, "masks": both}, images),
                             rtol=1e-4, atol=1e-4)


# Quantized layers and no recompiles -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepQuantizer:
  """LSQ-like: weights ``clip(round(w / step), -n, n) * step``, ``n = 2^(b-1) - 1``,
  ``step`` a learnt per-layer scalar; activations clipped to ``[0, a_clip]`` on
  ``2^b - 1`` levels; identity at 32 bits."""

  def param_inits(self, kernel_shape):
    del kernel_shape
    return {"w_step": (lambda key, shape: jnp.full(shape, 0.03, jnp.float32), ()),
            "a_clip": (lambda key, shape: jnp.full(shape, 4.0, jnp.float32), ())}

  def weights(self, w, bits, qparams):
    n = jnp.exp2(bits.astype(jnp.float32) - 1) - 1
    q = jnp.clip(jnp.round(w / qparams["w_step"]), -n, n) * qparams["w_step"]
    return jnp.where(bits >= 32, w, q)

  def activations(self, x, bits, qparams):
    n, clip = jnp.exp2(bits.astype(jnp.float32)) - 1, qparams["a_clip"]
    return jnp.where(bits >= 32, x, jnp.round(jnp.clip(x, 0, clip) / clip * n) * clip / n)


def _set_bits(quant, w_bits: int, a_bits: int = 32):
  """All layers at ``w_bits``/``a_bits`` except the stem and head (32)."""
  def bits(path, leaf):
    layer, kind = path[0].key, path[-1].key
    full = layer in ("stem_conv", "head")
    return jnp.asarray(32 if full else (w_bits if kind == "w_bits" else a_bits), jnp.int32)
  return jax.tree_util.tree_map_with_path(bits, quant)


def test_quantized_compaction_and_no_recompile(images):
  """Weights at 4 bits through a per-layer learnt step: the quantizer parameters and
  bit-widths are copied, so the small model's quantized logits are the masked
  model's. (Activations stay at 32 bits here: rounding them would turn last-ulp
  differences of the two summation orders into whole quantization steps.)"""
  model = get_model("resnet8", quantizer=StepQuantizer())
  variables, structure = _setup(model, (32, 32, 3), seed=9)
  variables["params"] = jax.tree_util.tree_map_with_path(
      lambda p, v: {"w_step": jnp.full_like(v, 0.03), "a_clip": jnp.full_like(v, 4.0)}.get(
          p[-1].key, v), variables["params"])
  variables["quant"] = _set_bits(variables["quant"], 4)
  variables["masks"] = _random_masks(structure, seed=10)
  small, small_vars = compact(model, variables, structure)
  assert small.quantizer == StepQuantizer()
  assert jax.tree.map(int, small_vars["quant"]) == jax.tree.map(int, variables["quant"])
  traces = []

  @jax.jit
  def apply(v, x):
    traces.append(1)
    return small.apply(v, x)

  expected = _logits(model, variables, images)
  np.testing.assert_allclose(apply(small_vars, images), expected, rtol=1e-4, atol=1e-4)
  fewer_bits = {**small_vars, "quant": _set_bits(small_vars["quant"], 3, 6)}
  assert not np.allclose(apply(fewer_bits, images), expected, atol=1e-3)
  assert len(traces) == 1


def test_zero_pruned_weights_makes_dorefa_compaction_exact(images):
  """DoReFa normalizes by ``max |tanh W|`` over the whole kernel, pruned weights
  included. Zeroing the weights that only meet pruned channels leaves the masked
  full-precision logits alone and makes the compacted DoReFa model exact."""
  quantizers = pytest.importorskip("picpq_jax.compress.quantizers")
  model, variables, structure, *_ = _compacted("resnet20")
  traces = []

  @functools.partial(jax.jit, static_argnums=1)
  def zero(v, s):
    traces.append(1)
    return zero_pruned_weights(v, s)

  zeroed = zero(variables, structure)
  zero({**variables, "masks": _random_masks(structure, seed=11)}, structure)
  assert len(traces) == 1
  kernel = np.asarray(variables["params"]["stage2_block0"]["conv1"]["kernel"])
  got = np.asarray(zeroed["params"]["stage2_block0"]["conv1"]["kernel"])
  m_in, m_out = (np.asarray(variables["masks"][g]) for g in ("stage1", "stage2_block0_mid"))
  np.testing.assert_array_equal(got, kernel * m_in[:, None] * m_out)
  np.testing.assert_allclose(_logits(model, zeroed, images), _logits(model, variables, images),
                             rtol=1e-5, atol=1e-5)

  dorefa = get_model("resnet20", quantizer=quantizers.DoReFa())
  quant = _set_bits(variables["quant"], 4)
  for v, exact in ((variables, False), (zeroed, True)):
    v = {**v, "quant": quant}
    small, small_vars = compact(dorefa, v, structure)
    close = np.allclose(_logits(small, small_vars, images), _logits(dorefa, v, images),
                        rtol=1e-4, atol=1e-4)
    assert close == exact


# Bad input -------------------------------------------------------------------------------


def test_bad_masks_and_group_sizes_raise():
  model, variables, structure, *_ = _compacted("resnet20")
  half = {**variables["masks"], "stage1": variables["masks"]["stage1"] * 0.5}
  with pytest.raises(UserError, match="0/1"):
    compact(model, {**variables, "masks": half}, structure)
  empty = {**variables["masks"], "stage2": jnp.zeros(32)}
  with pytest.raises(UserError, match="keeps no channel"):
    compact(model, {**variables, "masks": empty}, structure)
  with pytest.raises(UserError, match="do not match"):
    compact(model, variables, _compacted("vgg16")[2])
  with pytest.raises(UserError, match="stage9"):
    jax.eval_shape(CifarResNet(depth=8, group_sizes=(("stage9", 3),)).init,
                   jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_kept_channels_hand_example():
  kept = kept_channels({"a": jnp.array([0.0, 1.0, 1.0, 0.0, 1.0])})
  np.testing.assert_array_equal(kept["a"], [1, 2, 4])


def test_pad_channels_hand_example():
  kept = {"a": np.array([1, 4]), "b": np.array([0, 1, 2]), "c": np.array([5])}
  padded = pad_channels(kept, {"a": 8, "b": 3, "c": 6}, 4)
  np.testing.assert_array_equal(padded["a"], [0, 1, 2, 4])  # 2 -> 4: first pruned 0, 2
  np.testing.assert_array_equal(padded["b"], [0, 1, 2])  # capped at the group's 3
  np.testing.assert_array_equal(padded["c"], [0, 1, 2, 5])
  with pytest.raises(UserError, match="at least 1"):
    pad_channels(kept, {"a": 8, "b": 3, "c": 6}, 0)


def test_padded_compaction_keeps_logits_and_exact_macs(images):
  """Widths padded to a multiple of 8, logits of the masked model, and the padded
  model's masks still count the unpadded (hand-counted) MACs."""
  from picpq_jax.compress import cost_model
  model, variables, structure, small, small_vars, kept = _compacted("resnet20")
  padded, padded_vars = compact(model, variables, structure, pad_to=8)
  padded_structure = model_structure(padded, structure.input_shape)
  full = {g.name: g.size for g in structure.groups}
  for g in padded_structure.groups:
    assert g.size == min(full[g.name], -(-kept[g.name] // 8) * 8)
  np.testing.assert_allclose(_logits(padded, padded_vars, images),
                             _logits(model, variables, images), rtol=1e-5, atol=1e-5)
  macs = cost_model.cost(padded_structure, padded_vars["masks"]).macs
  assert int(round(float(macs))) == cifar_resnet_counts(20, kept)[0]
  mask = np.asarray(padded_vars["masks"]["stage2_block0_mid"])
  kernel = np.asarray(padded_vars["params"]["stage2_block0"]["conv1"]["kernel"])
  assert np.all(kernel[..., mask == 0] == 0)  # padding channels carry zero weights
