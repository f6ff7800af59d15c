"""Filter properties against independent NumPy computations.

Ranks are checked against ``numpy.linalg.matrix_rank`` map by map; the rank filter
property of a model against maps taken with Flax's ``capture_intermediates`` (BN
outputs and block outputs, with the ReLU applied here), ranked one by one in NumPy.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from picpq_jax.compress import criteria
from picpq_jax.errors import UserError
from picpq_jax.models import MobileNetV2, get_model, get_spec, model_structure
from picpq_jax.models.structure import ChannelGroup, LayerInfo, ModelStructure


def _known_rank_maps(rng, hw: tuple[int, int], conditioned: bool):
  """Maps ``[1, H, W, M]`` of known rank R = 0..min(H, W), plus zero and constant maps.

  ``conditioned``: orthonormal factors and singular values in [1, 10]; else products
  of Gaussian ``H x R`` and ``R x W`` matrices (some nearly singular).
  """
  h, w = hw
  maps, ranks = [], []
  for r in range(min(h, w) + 1):
    for _ in range(3):
      if conditioned:
        u = np.linalg.qr(rng.normal(size=(h, h)))[0][:, :r]
        v = np.linalg.qr(rng.normal(size=(w, w)))[0][:, :r]
        m = (u * rng.uniform(1, 10, size=r)) @ v.T
      else:
        m = rng.normal(size=(h, r)) @ rng.normal(size=(r, w))
      maps.append(m * 10.0 ** rng.uniform(-3, 3))
      ranks.append(r)
  maps += [np.zeros((h, w)), np.full((h, w), 3.5), np.full((h, w), -1e-4)]
  ranks += [0, 1, 1]
  stacked = np.stack(maps, axis=-1)[None].astype(np.float32)
  return stacked, np.array(ranks)


def _numpy_ranks(maps: np.ndarray) -> np.ndarray:
  """``[N, H, W, C]`` -> ``[N, C]`` by ``numpy.linalg.matrix_rank``, map by map."""
  n, _, _, c = maps.shape
  return np.array([[np.linalg.matrix_rank(maps[i, :, :, j]) for j in range(c)]
                   for i in range(n)])


@pytest.mark.parametrize("hw", [(32, 32), (16, 16), (8, 8), (8, 5), (4, 7)])
@pytest.mark.parametrize("conditioned", [True, False])
def test_svd_rank_matches_numpy(hw, conditioned):
  maps, ranks = _known_rank_maps(np.random.default_rng(hw[0] * 10 + hw[1]), hw, conditioned)
  want = _numpy_ranks(maps)[0]
  np.testing.assert_array_equal(want, ranks)  # the maps have the ranks they were built with
  got = jax.jit(criteria.feature_map_rank)(maps)
  assert got.dtype == jnp.float32 and got.shape == (maps.shape[-1],)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_feature_map_rank_averages_over_examples():
  rng = np.random.default_rng(1)
  n, h, w, c = 5, 8, 8, 4
  r = rng.integers(0, 9, size=(n, c))
  maps = np.zeros((n, h, w, c), np.float32)
  for i in range(n):
    for j in range(c):
      maps[i, :, :, j] = rng.normal(size=(h, r[i, j])) @ rng.normal(size=(r[i, j], w))
  got = criteria.feature_map_rank(jnp.asarray(maps))
  np.testing.assert_allclose(np.asarray(got), _numpy_ranks(maps).mean(axis=0), rtol=1e-6)


def test_feature_map_rank_rejects_bad_input():
  with pytest.raises(AssertionError):
    criteria.feature_map_rank(jnp.zeros((4, 4, 2)))


# ------------------------------------------------------------------- models


def _random_variables(model, input_shape, seed=0) -> dict:
  """Variables of ``model`` with random kernels, BN scales/shifts/statistics; masks 1."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))

  def fill(path, leaf):
    collection, last = path[0].key, path[-1].key
    if collection in ("masks", "quant"):
      return jnp.full(leaf.shape, 1 if collection == "masks" else 32, leaf.dtype)
    if last == "kernel":
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    elif last in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    else:
      value = rng.normal(size=leaf.shape) * 0.3
    return jnp.asarray(value, leaf.dtype)

  return dict(jax.tree_util.tree_map_with_path(fill, abstract))


@pytest.fixture(scope="module")
def resnet8():
  model = get_model("resnet8")
  shape = get_spec("resnet8").input_shape
  return model, _random_variables(model, shape), model_structure(model, shape)


def _reference_maps(model, variables, images) -> dict[str, np.ndarray]:
  """HRank's hook points of a 1-block-per-stage CIFAR ResNet, from Flax's intermediates."""
  apply = jax.jit(functools.partial(model.apply, train=False, capture_intermediates=True,
                                    mutable=["intermediates"]))
  _, state = apply(variables, images)
  inter = traverse_util.flatten_dict(state["intermediates"], sep="/")
  relu = lambda name: np.maximum(np.asarray(inter[f"{name}/__call__"][0]), 0)
  maps = {"stem_conv": relu("stem_bn")}
  for s in (1, 2, 3):
    block = f"stage{s}_block0"
    maps[f"{block}/conv1"] = relu(f"{block}/bn1")
    maps[f"{block}/conv2"] = np.asarray(inter[f"{block}/__call__"][0])  # relu(bn2 + shortcut)
    maps[f"{block}/conv1/raw"] = np.asarray(inter[f"{block}/conv1/__call__"][0])
  maps["stem_conv/raw"] = np.asarray(inter["stem_conv/__call__"][0])
  return maps


def test_rank_property_matches_numpy_on_post_activation_maps(resnet8):
  model, variables, structure = resnet8
  rng = np.random.default_rng(3)
  batches = [rng.normal(size=(2, 32, 32, 3)).astype(np.float32) for _ in range(2)]
  fp = criteria.filter_property_rank(model, variables, iter(batches), structure)
  refs = [_reference_maps(model, variables, x) for x in batches]
  names = [l.name for l in structure.layers if l.out_group is not None]
  assert list(fp) == names
  for name in names:
    ranks = np.concatenate([_numpy_ranks(r[name]) for r in refs])  # [4, C]
    assert fp[name].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(fp[name]), ranks.mean(axis=0), rtol=1e-6, err_msg=name)

  raw = criteria.filter_property_rank(model, variables, batches[:1], structure, point="conv")
  for name in ("stem_conv", "stage2_block0/conv1"):
    ranks = _numpy_ranks(refs[0][f"{name}/raw"])
    np.testing.assert_allclose(np.asarray(raw[name]), ranks.mean(axis=0), rtol=1e-6)


def test_rank_property_compiles_once_and_sees_masks(resnet8, monkeypatch):
  model, variables, structure = resnet8
  traces = []
  original = criteria._map_ranks
  monkeypatch.setattr(criteria, "_map_ranks", lambda *a: (traces.append(1), original(*a))[1])
  criteria._rank_sums_fn.cache_clear()
  rng = np.random.default_rng(4)
  batches = [rng.normal(size=(2, 32, 32, 3)).astype(np.float32) for _ in range(3)]
  criteria.filter_property_rank(model, variables, batches, structure)
  layers = len([l for l in structure.layers if l.out_group is not None])
  assert len(traces) == layers  # one trace for three batches

  masks = dict(variables["masks"])
  masks["stage1_block0_mid"] = masks["stage1_block0_mid"].at[3].set(0.0)
  fp = criteria.filter_property_rank(model, {**variables, "masks": masks}, batches, structure)
  assert len(traces) == layers  # new mask values: no retrace
  conv1 = np.asarray(fp["stage1_block0/conv1"])
  assert conv1[3] == 0.0 and np.all(np.delete(conv1, 3) > 0)

  criteria.filter_property_rank(model, variables, [batches[0][:1]], structure)
  assert len(traces) == 2 * layers  # a new batch shape: one more trace
  criteria._rank_sums_fn.cache_clear()


@functools.cache
def _abstract(name: str):
  """``(model, structure, abstract variables, abstract input [2, H, W, C])`` of a registry model."""
  model, spec = get_model(name), get_spec(name)
  x = jax.ShapeDtypeStruct((2, *spec.input_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return model, model_structure(model, spec.input_shape), variables, x


@pytest.mark.parametrize("name", ["vgg16", "mobilenetv2", "resnet18"])
def test_every_prunable_layer_gets_a_map_of_its_output_shape(name):
  model, structure, variables, x = _abstract(name)
  for point in criteria.CAPTURE_POINTS:
    maps = jax.eval_shape(
        lambda v, x: criteria._capture(model, structure, v, x, point), variables, x)
    want = {l.name: (2, *l.out_hw, l.out_features) for l in structure.layers if l.out_group}
    assert {k: v.shape for k, v in maps.items()} == want


def test_mobilenet_maps_are_after_relu6_and_projection_maps_are_linear():
  model = MobileNetV2(width_mult=0.25, cfg=((1, 16, 1, 1), (6, 24, 2, 1)), last_features=64)
  structure = model_structure(model, (8, 8, 3))
  variables = _random_variables(model, (8, 8, 3), seed=5)
  images = jnp.asarray(np.random.default_rng(5).normal(size=(2, 8, 8, 3)), jnp.float32)


  def both(v, x):  # one compiled program: the captured maps and Flax's intermediates
    _, state = model.apply(v, x, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    return criteria._capture(model, structure, v, x, "activation"), state["intermediates"]

  maps, inter = jax.jit(both)(variables, images)
  assert len(maps) == 10  # stem, 3 projections, 3 depthwise, 2 expansions, last
  for name, m in maps.items():
    m = np.asarray(m)
    if "project_conv" in name:
      assert m.min() < 0, name  # BN output (+ residual), no activation
    else:
      assert m.min() >= 0 and m.max() <= 6 and m.max() > 0, name
  # A residual block's projection sees the block output: conv output + BN + input.
  np.testing.assert_allclose(np.asarray(maps["stage2_block1/project_conv"]),
                             np.asarray(inter["stage2_block1"]["__call__"][0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(maps["stage2_block0/dw_conv"]),
                             np.clip(np.asarray(inter["stage2_block0"]["dw_bn"]["__call__"][0]),
                                     0, 6), atol=1e-5)


def test_capture_point_and_empty_batches_are_checked(resnet8):
  model, variables, structure = resnet8
  with pytest.raises(UserError, match="capture point"):
    criteria.filter_property_rank(model, variables, [], structure, point="relu")
  with pytest.raises(UserError, match="no images"):
    criteria.filter_property_rank(model, variables, [], structure)


# --------------------------------------------------------------- weight-based


def _hand_structure() -> ModelStructure:
  """conv ``a/conv`` (3x3, 2 -> 4) writes g1; dense ``fc`` (4 -> 3) writes g2."""
  conv = LayerInfo("a/conv", "conv", None, "g1", 2, 4, (3, 3), (1, 1), 1, False, (5, 5), (5, 5))
  fc = LayerInfo("fc", "dense", "g1", "g2", 4, 3, (1, 1), (1, 1), 1, True, (1, 1), (1, 1))
  head = LayerInfo("head", "dense", "g2", None, 3, 2, (1, 1), (1, 1), 1, True, (1, 1), (1, 1))
  groups = (ChannelGroup("g1", 4, ("a/conv",), ("fc",), ()),
            ChannelGroup("g2", 3, ("fc",), ("head",), ()))
  return ModelStructure((5, 5, 2), (conv, fc, head), groups)


def test_l1_l2_per_output_filter():
  rng = np.random.default_rng(6)
  conv, fc = rng.normal(size=(3, 3, 2, 4)), rng.normal(size=(4, 3))
  params = {"a": {"conv": {"kernel": jnp.asarray(conv, jnp.float32)}},
            "fc": {"kernel": jnp.asarray(fc, jnp.float32), "bias": jnp.ones(3)},
            "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  structure = _hand_structure()
  l1, l2 = criteria.l1_norm(params, structure), criteria.l2_norm(params, structure)
  assert set(l1) == set(l2) == {"a/conv", "fc"}
  for o in range(4):
    np.testing.assert_allclose(l1["a/conv"][o], np.abs(conv[..., o]).sum(), rtol=1e-5)
    np.testing.assert_allclose(l2["a/conv"][o], np.sqrt((conv[..., o] ** 2).sum()), rtol=1e-5)
  np.testing.assert_allclose(l1["fc"], np.abs(fc).sum(0), rtol=1e-5)
  np.testing.assert_allclose(l2["fc"], np.linalg.norm(fc, axis=0), rtol=1e-5)


def test_bn_gamma_follows_the_naming_convention(resnet8):
  _, variables, structure = resnet8
  params = variables["params"]
  gamma = criteria.bn_gamma(params, structure)
  want = {"stem_conv": params["stem_bn"]["scale"]}
  for s in (1, 2, 3):
    block = params[f"stage{s}_block0"]
    want[f"stage{s}_block0/conv1"] = block["bn1"]["scale"]
    want[f"stage{s}_block0/conv2"] = block["bn2"]["scale"]
  assert set(gamma) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(gamma[k]), np.abs(np.asarray(v)))


@pytest.mark.parametrize("name", ["vgg16", "mobilenetv2", "resnet18"])
def test_bn_gamma_finds_a_bn_for_every_registry_conv(name):
  _, structure, variables, _ = _abstract(name)
  gamma = jax.eval_shape(lambda p: criteria.bn_gamma(p, structure), variables["params"])
  assert {k: v.shape for k, v in gamma.items()} == {
      l.name: (l.out_features,) for l in structure.layers if l.out_group}
  assert criteria.bn_name("layer3/conv") == "layer3/bn"
  assert criteria.bn_name("stage2_block0/downsample_conv") == "stage2_block0/downsample_bn"


def test_bn_gamma_without_bn_is_a_user_error():
  structure = _hand_structure()
  params = {"a": {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}, "fc": {"kernel": jnp.ones((4, 3))}}
  with pytest.raises(UserError, match="no BatchNorm 'a/bn'"):
    criteria.bn_gamma(params, structure)
  params["a"]["bn"] = {"scale": jnp.ones(4), "bias": jnp.zeros(4)}
  with pytest.raises(UserError, match="'fc' has no 'conv'"):
    criteria.bn_gamma(params, structure)


def test_filter_property_dispatch(resnet8):
  model, variables, structure = resnet8
  with pytest.raises(UserError, match="unknown filter property 'taylor'"):
    criteria.filter_property("taylor", model, variables, None, structure)
  with pytest.raises(UserError, match="needs batches"):
    criteria.filter_property("rank", model, variables, None, structure)
  with pytest.raises(UserError, match="'rank' only"):
    criteria.filter_property("l1", model, variables, None, structure, point="conv")
  l2 = criteria.filter_property("l2", model, variables, None, structure)
  kernel = np.asarray(variables["params"]["stage3_block0"]["conv2"]["kernel"])
  np.testing.assert_allclose(np.asarray(l2["stage3_block0/conv2"]),
                             np.sqrt((kernel ** 2).sum(axis=(0, 1, 2))), rtol=1e-5)


# ------------------------------------------------------------ bidiagonal ranks


@pytest.mark.parametrize("hw", [(32, 32), (16, 16), (8, 8), (8, 5), (4, 7), (1, 1)])
def test_bidiagonal_rank_matches_numpy(hw):
  rng = np.random.default_rng(hw[0] * 10 + hw[1])
  # well and badly conditioned maps in one batch: one compilation per size
  parts = [_known_rank_maps(rng, hw, conditioned) for conditioned in (True, False)]
  maps = np.concatenate([m for m, _ in parts], axis=-1)
  want = _numpy_ranks(maps)[0]
  np.testing.assert_array_equal(want, np.concatenate([r for _, r in parts]))
  got = jax.jit(functools.partial(criteria.feature_map_rank, method="bidiagonal"))(maps)
  assert got.dtype == jnp.float32 and got.shape == (maps.shape[-1],)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_bidiagonal_rank_of_relu_maps_in_chunks(monkeypatch):
  # post-ReLU maps with zero and repeated rows/columns, enough of them for several chunks
  rng = np.random.default_rng(7)
  maps = np.maximum(rng.normal(size=(40, 16, 16, 9)), 0).astype(np.float32)
  maps[:, :, :5, :3] = maps[:, :, :1, :3]  # 4 repeated columns
  maps[:, 10:, :, 3:6] = 0.0  # 6 zero rows
  maps[:, :, :, 6] *= 1e-30  # tiny but nonzero
  maps[:5, :, :, 7] = 0.0  # all-zero maps
  monkeypatch.setattr(criteria, "_CHUNK_BYTES", 16 * 16 * 4 * 64)  # 64 maps per chunk
  got = criteria._layer_ranks_bidiagonal({"x": jnp.asarray(maps)})["x"]
  np.testing.assert_array_equal(np.asarray(got), _numpy_ranks(maps))


def test_bidiagonal_rank_property_equals_numpy_and_svd(resnet8):
  model, variables, structure = resnet8
  rng = np.random.default_rng(3)
  # 8x8 images: maps of 8x8, 4x4 and 2x2 (the sizes only change the compile time)
  batches = [rng.normal(size=(2, 8, 8, 3)).astype(np.float32) for _ in range(2)]
  fp = criteria.filter_property_rank(model, variables, batches, structure, method="bidiagonal")
  refs = [_reference_maps(model, variables, x) for x in batches]
  for name in fp:
    ranks = np.concatenate([_numpy_ranks(r[name]) for r in refs])
    np.testing.assert_allclose(np.asarray(fp[name]), ranks.mean(axis=0), rtol=1e-6, err_msg=name)
  with pytest.raises(UserError, match="rank method"):
    criteria.filter_property("rank", model, variables, batches, structure, method="qr")
