"""CsiNet and CRNet: published sizes, shapes, decoder stages, bad compression ratios."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picpq_jax import csi
from picpq_jax.errors import UserError
from picpq_jax.models import param_count

# CsiNet's parameters (millions) as the CsiNet/CRNet/CLNet papers' tables give them.
CSINET_PUBLISHED_M = {4: 2.10, 16: 0.53, 32: 0.27, 64: 0.14}
# CRNet's "Flops" (multiply-accumulates, millions) from Kylin9511/CRNet's README
# (Table 1 of Lu et al. 2020). 3.28 at CR 32 is 3,287,040 truncated (the others round).
CRNET_PUBLISHED_MMACS = {4: 5.12, 8: 4.07, 16: 3.55, 32: 3.28, 64: 3.16}
# CRNet's parameters counted by hand from the reference PyTorch module (conv kernels
# without bias, BN scale/shift, both dense layers with bias): 2,850 in the two
# CRBlocks, 104 in the 5x5 head, 172 in the encoder's convs.
CRNET_REFERENCE_PARAMS = {cr: 172 + 104 + 2850 + 2 * 2048 * (2048 // cr) + 2048 + 2048 // cr
                          for cr in (4, 8, 16, 32, 64)}


X = jax.ShapeDtypeStruct((3, 32, 32, 2), jnp.float32)


@functools.cache
def shapes(arch, cr):
  """The variables' shapes (``jax.eval_shape``: nothing compiled or computed)."""
  model = csi.get_csi_model(arch, cr)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), X)


@functools.cache
def variables(arch, cr):
  return csi.init_csi_variables(csi.get_csi_model(arch, cr), jax.random.key(0))


def decoder_part(v):
  return {col: tree["decoder"] for col, tree in v.items() if "decoder" in tree}


@pytest.mark.parametrize("cr", sorted(CSINET_PUBLISHED_M))
def test_csinet_parameter_count_matches_the_published_one(cr):
  count = param_count(shapes("csinet", cr)["params"])
  assert round(count / 1e6, 2) == CSINET_PUBLISHED_M[cr]


@pytest.mark.parametrize("cr", sorted(CRNET_PUBLISHED_MMACS))
def test_crnet_size_matches_its_reference(cr):
  v = shapes("crnet", cr)
  assert param_count(v["params"]) == CRNET_REFERENCE_PARAMS[cr]
  macs = csi.layer_macs(csi.get_csi_model("crnet", cr), v, X)  # per sample
  assert abs(macs / 1e6 - CRNET_PUBLISHED_MMACS[cr]) < 0.01


@pytest.mark.parametrize("arch", sorted(csi.ARCHITECTURES))
@pytest.mark.parametrize("cr", csi.COMPRESSION_RATIOS)
def test_encoder_and_decoder_shapes(arch, cr):
  model = csi.get_csi_model(arch, cr)
  v = shapes(arch, cr)
  z = jax.eval_shape(functools.partial(model.apply, method="encode"), v, X)
  assert z.shape == (3, 2048 // cr)
  y = jax.eval_shape(model.decoder.apply, decoder_part(v), z)
  assert y.shape == X.shape


@pytest.mark.parametrize("arch", sorted(csi.ARCHITECTURES))
def test_split_encoder_and_decoder_equal_the_autoencoder(arch):
  model = csi.get_csi_model(arch, 16)
  v = variables(arch, 16)
  x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 2))
  y = model.decoder.apply(decoder_part(v), model.apply(v, x, method="encode"))
  assert bool(jnp.all((y > 0) & (y < 1)))
  np.testing.assert_allclose(y, model.apply(v, x), atol=1e-6)


@pytest.mark.parametrize("arch", sorted(csi.ARCHITECTURES))
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_decoder_stages_compose_to_the_whole_decoder(arch, stages):
  model = csi.get_csi_model(arch, 16)
  v = variables(arch, 16)
  dec = decoder_part(v)
  z = jax.random.normal(jax.random.key(2), (2, 128))
  spans = csi.decoder_stages(model.decoder, stages, 128)
  assert spans[0][0] == 0 and spans[-1][1] == 4 and len(spans) == stages
  h, merged = z, {}
  for span in spans:
    stage = model.decoder.clone(span=span)
    part = csi.stage_variables(dec, model.decoder, span)
    own = jax.eval_shape(stage.init, jax.random.key(0), h)  # what the stage creates
    assert jax.tree.structure(own) == jax.tree.structure(part)
    h = stage.apply(part, h)
    for col, tree in part.items():
      assert not set(tree) & set(merged.get(col, {}))  # stages share no variables
      merged.setdefault(col, {}).update(tree)
  np.testing.assert_allclose(h, model.decoder.apply(dec, z), atol=1e-6)
  assert jax.tree.structure(merged) == jax.tree.structure(dec)


# MACs per sample counted by hand from the layer lists in the models' docstrings
# (32 x 32 output positions times kernel entries; fc: M x 2048).
FC = 512 * 2048  # CR 4
REFINE = 1024 * 9 * (2 * 8 + 8 * 16 + 16 * 2)
CRBLOCK = 1024 * (9 * 2 * 7 + 9 * 7 * 7 + 9 * 7 * 7 + 5 * 2 * 7 + 5 * 7 * 7 + 14 * 2)


def test_stages_are_cut_where_the_counted_macs_balance():
  csinet, crnet = csi.CsiNetDecoder(), csi.CRNetDecoder()
  assert csi.piece_macs(csinet, 512) == (FC, REFINE, REFINE, 1024 * 9 * 2 * 2)
  assert csi.piece_macs(crnet, 512) == (FC, 1024 * 25 * 2 * 2, CRBLOCK, CRBLOCK)
  # CRNet: fc + head + crblock1 (2.53M) | crblock2 (1.38M); by piece count it was
  # fc + head (1.15M) | both crblocks (2.77M)
  assert csi.decoder_stages(crnet, 2, 512) == ((0, 3), (3, 4))
  assert csi.decoder_stages(csinet, 2, 512) == ((0, 2), (2, 4))  # 2.67M | 1.66M
  assert csi.decoder_stages(csinet, 3, 512) == ((0, 1), (1, 2), (2, 4))  # max 1.66M
  assert csi.decoder_stages(csinet, 4, 512) == ((0, 1), (1, 2), (2, 3), (3, 4))
  # given costs (e.g. measured seconds) replace the count
  assert csi.decoder_stages(crnet, 2, 512, (1, 1, 1, 5)) == ((0, 3), (3, 4))
  assert csi.decoder_stages(crnet, 2, 512, (5, 1, 1, 1)) == ((0, 1), (1, 4))
  for bad in (0, 5):
    with pytest.raises(UserError, match="pipeline stages"):
      csi.decoder_stages(csinet, bad, 512)


@pytest.mark.parametrize("cr", [3, 0, 4096, 2.0])
def test_a_ratio_that_does_not_divide_2048_is_a_one_line_user_error(cr):
  with pytest.raises(UserError, match="must be a positive integer dividing 2048") as e:
    csi.get_csi_model("csinet", cr)
  assert "\n" not in str(e.value)


def test_unknown_architecture_is_a_user_error():
  with pytest.raises(UserError, match="choose one of crnet, csinet"):
    csi.get_csi_model("csinet2", 4)


# The quiet start, leaf by leaf (BN scales draw 1, shifts 0): what changes, to what.
QUIET = {"csinet": {("out", "kernel"): lambda drawn: 0.01 * drawn},
         "crnet": {("head", "bn", "scale"): lambda d: np.full_like(d, 0.1),
                   ("head", "bn", "bias"): lambda d: np.full_like(d, 0.3),
                   ("crblock1", "merge_conv1x1", "bn", "scale"): np.zeros_like,
                   ("crblock2", "merge_conv1x1", "bn", "scale"): np.zeros_like,
                   ("crblock2", "merge_conv1x1", "bn", "bias"): lambda d: np.full_like(d, -0.3)}}


@pytest.mark.parametrize("arch", sorted(QUIET))
def test_quiet_start_changes_only_its_leaves_and_the_rest_is_the_default_draw(arch):
  model = csi.get_csi_model(arch, 16)
  quiet = variables(arch, 16)
  default = csi.init_csi_variables(model, jax.random.key(0), quiet=False)
  flat_q, flat_d = ({tuple(p.key for p in k): v for k, v in
                     jax.tree_util.tree_flatten_with_path(v["params"])[0]} for v in (quiet, default))
  changed = {("decoder", *path): f for path, f in QUIET[arch].items()}
  assert set(changed) <= set(flat_q)
  for k, v in flat_q.items():
    want = changed[k](np.asarray(flat_d[k])) if k in changed else flat_d[k]
    np.testing.assert_allclose(v, want, rtol=1e-6, atol=0)
