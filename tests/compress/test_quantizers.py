"""DoReFa, LSQ and PACT against NumPy transcriptions of their papers' formulas.

Forward values, level counts, straight-through gradients and tie rules on random
and hand-worked arrays; then the quantizers inside a ResNet-8: bit-widths change
without recompiling, and at 32 bits the logits equal the full-precision model's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from picpq_jax.compress.numerics import clip_ste, round_ste, scale_grad, uniform_quantize
from picpq_jax.compress.quantizers import DoReFa, LSQ, PACT, calibrate_lsq
from picpq_jax.errors import UserError
from picpq_jax.models import QDense, get_model, get_spec

RNG = np.random.default_rng(0)


def bits(k: int) -> jax.Array:
  return jnp.asarray(k, jnp.int32)


# ---- NumPy transcriptions (float64) ----------------------------------------------

def np_dorefa_w(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
  """(quantized, pre-round value, levels per unit): q_{k-1}(tanh W / max|tanh W|)."""
  if k >= 32:
    return w, w, 1.0
  t = np.tanh(w.astype(np.float64))
  n = 2.0 ** (k - 1) - 1
  pre = t / np.abs(t).max() * n
  return np.round(pre) / n, pre, n


def np_dorefa_a(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
  if k >= 32:
    return x, x, 1.0
  n = 2.0 ** k - 1
  pre = np.clip(x.astype(np.float64), 0, 1) * n
  return np.round(pre) / n, pre, n


def np_lsq(v: np.ndarray, s: float, q_n: float, q_p: float) -> tuple[np.ndarray, np.ndarray, float]:
  pre = np.clip(v.astype(np.float64) / s, -q_n, q_p)
  return np.round(pre) * s, pre, 1.0 / s


def np_pact(x: np.ndarray, alpha: float, k: int) -> tuple[np.ndarray, np.ndarray, float]:
  n = 2.0 ** k - 1
  pre = np.clip(x.astype(np.float64), 0, alpha) * n / alpha
  return np.round(pre) * alpha / n, pre, n / alpha


def assert_rounded_like(got, want, pre, per_unit) -> None:
  """Equal to float32 precision, except where NumPy's pre-round value sits on a
  rounding boundary (within 1e-4 of k + 1/2): there the two may pick either
  neighbour, so only a one-level difference is allowed."""
  got = np.asarray(got, np.float64)
  ambiguous = np.abs(np.abs(pre - np.floor(pre)) - 0.5) < 1e-4
  np.testing.assert_allclose(got[~ambiguous], want[~ambiguous], rtol=1e-6, atol=1e-6)
  assert np.all(np.abs(got - want)[ambiguous] <= 1.0 / per_unit + 1e-6)


# ---- numerics --------------------------------------------------------------------

def test_round_ste_is_half_to_even_with_identity_gradient():
  x = jnp.asarray([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 0.51], jnp.float32)
  np.testing.assert_array_equal(round_ste(x), [-2, -2, -0, 0, 2, 2, 0, 1])  # torch.round
  c = jnp.arange(8, dtype=jnp.float32)
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(c * round_ste(x)))(x), np.arange(8))


def test_clip_ste_tie_rules():
  x = jnp.asarray([-1.0, 0.0, 0.5, 1.0, 2.0], jnp.float32)
  c = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0], jnp.float32)
  for ties_inside, dx, dlo, dhi in ((True, [0, 2, 3, 4, 0], 1.0, 5.0),
                                    (False, [0, 0, 3, 0, 0], 3.0, 9.0)):
    f = lambda x, lo, hi: jnp.sum(c * clip_ste(x, lo, hi, ties_inside=ties_inside))
    gx, glo, ghi = jax.grad(f, argnums=(0, 1, 2))(x, jnp.float32(0.0), jnp.float32(1.0))
    np.testing.assert_array_equal(gx, dx)
    assert (float(glo), float(ghi)) == (dlo, dhi)
    np.testing.assert_array_equal(clip_ste(x, 0.0, 1.0, ties_inside=ties_inside),
                                  [0, 0, 0.5, 1, 1])


def test_scale_grad_is_exact_identity_forward():
  x = jnp.asarray(RNG.normal(size=7), jnp.float32)
  np.testing.assert_array_equal(scale_grad(x, jnp.float32(0.3)), x)
  g = jax.grad(lambda x: jnp.sum(scale_grad(x, jnp.float32(0.25)) * 2.0))(x)
  np.testing.assert_allclose(g, np.full(7, 0.5))


def test_uniform_quantize_grid():
  x = jnp.asarray(RNG.uniform(size=100), jnp.float32)
  for k in (1, 3, 8):
    want, pre, n = np_dorefa_a(np.asarray(x), k)
    assert_rounded_like(uniform_quantize(x, bits(k)), want, pre, n)


# ---- DoReFa ----------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 4, 8, 32])
def test_dorefa_forward_matches_numpy(k):
  w = RNG.normal(size=(3, 3, 8, 16)).astype(np.float32) * 0.3
  x = RNG.normal(size=(4, 5, 5, 8)).astype(np.float32) * 0.8 + 0.3
  q = DoReFa()
  assert_rounded_like(q.weights(jnp.asarray(w), bits(k), {}), *np_dorefa_w(w, k))
  assert_rounded_like(q.activations(jnp.asarray(x), bits(k), {}), *np_dorefa_a(x, k))
  if k == 32:  # bit-exact pass-through
    np.testing.assert_array_equal(q.weights(jnp.asarray(w), bits(k), {}), w)
    np.testing.assert_array_equal(q.activations(jnp.asarray(x), bits(k), {}), x)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_dorefa_level_counts(k):
  w = jnp.asarray(RNG.normal(size=4096), jnp.float32)
  x = jnp.asarray(RNG.uniform(-0.5, 1.5, size=4096), jnp.float32)
  wq = np.asarray(DoReFa().weights(w, bits(k), {}))
  aq = np.asarray(DoReFa().activations(x, bits(k), {}))
  w_levels, a_levels = np.unique(wq), np.unique(aq)
  assert len(w_levels) <= 2 ** (k - 1) * 2 - 1 and len(a_levels) <= 2 ** k
  # Every level is a grid point: symmetric i/(2^(k-1)-1) for weights, i/(2^k-1) for inputs.
  n_w, n_a = 2 ** (k - 1) - 1, 2 ** k - 1
  np.testing.assert_allclose(w_levels * n_w, np.round(w_levels * n_w), atol=1e-5)
  np.testing.assert_allclose(a_levels * n_a, np.round(a_levels * n_a), atol=1e-5)
  assert wq.min() == -1.0 and wq.max() == 1.0  # the max |tanh| maps to +-1


def test_dorefa_activation_gradient_is_clip_mask():
  x = RNG.uniform(-1.0, 2.0, size=200).astype(np.float32)
  x[:3] = [0.0, 1.0, 0.5]  # torch.clamp passes the gradient on the bounds
  c = RNG.normal(size=200).astype(np.float32)
  grad = lambda k: jax.grad(
      lambda x: jnp.sum(c * DoReFa().activations(x, bits(k), {})))(jnp.asarray(x))
  for k in (2, 4, 8):
    # STE through round(x * n) / n: 1 up to float32 rounding of (g / n) * n.
    np.testing.assert_allclose(grad(k), c * ((x >= 0) & (x <= 1)), rtol=1e-6, atol=0)
  np.testing.assert_array_equal(grad(32), c)


def test_dorefa_weight_gradient_is_unrounded_map_gradient():
  w = RNG.normal(size=(3, 3, 4, 5)).astype(np.float64) * 0.5
  c = RNG.normal(size=w.shape)
  # d/dw_i sum_j c_j t_j / m with t = tanh(w), m = |t_*| at the argmax |t|:
  t = np.tanh(w)
  star = np.unravel_index(np.argmax(np.abs(t)), w.shape)
  m = np.abs(t[star])
  want = c * (1 - t ** 2) / m
  want[star] -= np.sign(t[star]) * (1 - t[star] ** 2) * np.sum(c * t) / m ** 2
  for k in (2, 4, 8):
    got = jax.grad(lambda w: jnp.sum(jnp.asarray(c, jnp.float32) * DoReFa().weights(
        w, bits(k), {})))(jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_bits_are_data_vmapped_and_clamped():
  """A population of bit-widths under vmap, gradients included; k below a formula's
  minimum (2 for signed weights, 1 for activations) is raised to it, never NaN."""
  w = jnp.asarray(RNG.normal(size=(3, 3, 2, 4)), jnp.float32)
  ks = jnp.asarray([0, 1, 2, 4, 32], jnp.int32)
  qp = {"lsq_w_step": jnp.float32(0.3), "lsq_a_step": jnp.float32(0.3),
        "pact_alpha": jnp.float32(2.0)}
  fns = [(fn, floor) for q in (DoReFa(), LSQ(), PACT())
         for fn, floor in ((q.weights, 2), (q.activations, 1))]

  @jax.jit
  def population(w, ks):
    out = []
    for fn, floor in fns:
      loss = lambda w, k: jnp.sum(fn(w, k, qp) ** 2)
      out.append((jax.vmap(fn, in_axes=(None, 0, None))(w, ks, qp),
                  jax.vmap(jax.grad(loss), in_axes=(None, 0))(w, ks),
                  [fn(w, bits(max(k, floor)), qp) for k in (0, 1, 2, 4, 32)]))
    return out

  for values, grads, singles in population(w, ks):
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
    for i, single in enumerate(singles):
      # equal up to float rounding: under JAX 0.12.1 (the Python 3.12 run) the vmapped
      # program differs from the single ones by 1 ulp (6e-8); a wrong level would be
      # off by a whole grid step (>= 2 / (2^4 - 1) at the 1-4 bits tested; 32 is exact)
      np.testing.assert_allclose(values[i], single, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(values[-1], w)


# ---- LSQ -------------------------------------------------------------------------

def test_lsq_weights_hand_example():
  # k = 3: Q_N = 4, Q_P = 3; s = 0.25; v/s = [-4.8, -1.2, 0, 1.04, 3.6, 8].
  v = jnp.asarray([-1.2, -0.3, 0.0, 0.26, 0.9, 2.0], jnp.float32)
  step = jnp.float32(0.25)
  f = lambda v, s: LSQ().weights(v, bits(3), {"lsq_w_step": s})
  np.testing.assert_allclose(f(v, step), [-1.0, -0.25, 0.0, 0.25, 0.75, 0.75], atol=1e-7)
  gv, gs = jax.grad(lambda v, s: jnp.sum(f(v, s)), argnums=(0, 1))(v, step)
  np.testing.assert_array_equal(gv, [0, 1, 1, 1, 0, 0])
  # eq. 3 per element: -Q_N, -v/s + round(v/s) = 0.2, 0, -0.04, Q_P, Q_P; g = 1/sqrt(6 * 3).
  np.testing.assert_allclose(gs, (-4 + 0.2 + 0.0 - 0.04 + 3 + 3) / np.sqrt(18), rtol=1e-5)


def test_lsq_activations_hand_example():
  # k = 2: Q_N = 0, Q_P = 3; s = 0.2; N_F = 3 features per example (not 6).
  x = jnp.asarray([[0.13, 0.45, 2.0], [0.0, 0.27, 0.62]], jnp.float32)
  step = jnp.float32(0.2)
  f = lambda x, s: LSQ().activations(x, bits(2), {"lsq_a_step": s})
  np.testing.assert_allclose(f(x, step), [[0.2, 0.4, 0.6], [0.0, 0.2, 0.6]], atol=1e-7)
  gx, gs = jax.grad(lambda x, s: jnp.sum(f(x, s)), argnums=(0, 1))(x, step)
  np.testing.assert_array_equal(gx, [[1, 1, 0], [0, 1, 0]])
  np.testing.assert_allclose(gs, (0.35 - 0.25 + 3 + 0 - 0.35 + 3) / np.sqrt(3 * 3), rtol=1e-5)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_lsq_forward_matches_numpy(k):
  w = RNG.normal(size=(3, 3, 4, 8)).astype(np.float32) * 0.2
  x = np.abs(RNG.normal(size=(2, 4, 4, 4))).astype(np.float32)
  qp = {"lsq_w_step": jnp.float32(0.04), "lsq_a_step": jnp.float32(0.15)}
  assert_rounded_like(LSQ().weights(jnp.asarray(w), bits(k), qp),
                      *np_lsq(w, 0.04, 2 ** (k - 1), 2 ** (k - 1) - 1))
  assert_rounded_like(LSQ().activations(jnp.asarray(x), bits(k), qp),
                      *np_lsq(x, 0.15, 0, 2 ** k - 1))
  np.testing.assert_array_equal(LSQ().weights(jnp.asarray(w), bits(32), qp), w)


# ---- PACT ------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 4, 8])
def test_pact_forward_and_gradients(k):
  alpha = 2.5
  x = RNG.uniform(-1.0, 4.0, size=300).astype(np.float32)
  x[:2] = [alpha, 0.0]  # eq. 3: x = alpha sends its gradient to alpha
  c = RNG.normal(size=300).astype(np.float32)
  f = lambda x, a: PACT().activations(x, bits(k), {"pact_alpha": a})
  assert_rounded_like(f(jnp.asarray(x), jnp.float32(alpha)), *np_pact(x, alpha, k))
  gx, ga = jax.grad(lambda x, a: jnp.sum(c * f(x, a)), argnums=(0, 1))(
      jnp.asarray(x), jnp.float32(alpha))
  np.testing.assert_allclose(gx, c * ((x > 0) & (x < alpha)), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ga, np.sum(c[x >= alpha]), rtol=1e-5)
  w = jnp.asarray(RNG.normal(size=(3, 3, 2, 4)), jnp.float32)
  np.testing.assert_array_equal(PACT().weights(w, bits(k), {}), DoReFa().weights(w, bits(k), {}))


def test_pact_full_precision_passes_through():
  x = jnp.asarray(RNG.normal(size=50) * 20, jnp.float32)
  np.testing.assert_array_equal(PACT().activations(x, bits(32), {"pact_alpha": jnp.float32(10)}), x)


# ---- inside layers and models ----------------------------------------------------

def test_lsq_inside_qdense_matches_numpy():
  x = np.abs(RNG.normal(size=(3, 6))).astype(np.float32)
  layer = QDense(4, quantizer=LSQ())
  variables = layer.init(jax.random.key(0), jnp.asarray(x))
  assert set(variables["params"]) == {"kernel", "bias", "lsq_w_step", "lsq_a_step"}
  params = {**variables["params"], "bias": jnp.arange(4, dtype=jnp.float32)}
  quant = {"w_bits": bits(4), "a_bits": bits(3)}
  out = layer.apply({"params": params, "quant": quant}, jnp.asarray(x))
  kernel = np.asarray(params["kernel"])
  wq, _, _ = np_lsq(kernel, 0.05, 8, 7)
  xq, _, _ = np_lsq(x, 0.1, 0, 7)
  np.testing.assert_allclose(out, xq @ wq + np.arange(4), rtol=1e-5, atol=1e-5)


def _fill(path, leaf, rng):
  last = path[-1].key
  if path[0].key == "masks":
    return jnp.ones(leaf.shape, leaf.dtype)
  if path[0].key == "quant":
    return jnp.full(leaf.shape, 32, leaf.dtype)
  if last == "kernel":
    return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1])),
                       leaf.dtype)
  if last in ("scale", "var"):
    return jnp.asarray(rng.uniform(0.5, 1.5, size=leaf.shape), leaf.dtype)
  return jnp.asarray(rng.normal(size=leaf.shape) * 0.1, leaf.dtype)


@functools.cache
def _full_precision(name: str = "resnet8"):
  """Random full-precision variables of ``name``, a batch and the jitted logits."""
  model, spec = get_model(name), get_spec(name)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, *spec.input_shape)), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x[:1])
  rng = np.random.default_rng(0)
  variables = dict(jax.tree_util.tree_map_with_path(lambda p, l: _fill(p, l, rng), abstract))
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  return variables, x, logits


def _with_quantizer_params(variables: dict, quantizer) -> dict:
  """Adds ``quantizer.param_inits`` beside every kernel (the variables of the quantized model)."""
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  for path in [p for p in flat if p.endswith("/kernel")]:
    for name, (init, shape) in quantizer.param_inits(flat[path].shape).items():
      flat[path[:-len("kernel")] + name] = init(jax.random.key(0), shape)
  return {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}


def _set_bits(quant: dict, layers: dict[str, int]) -> dict:
  flat = traverse_util.flatten_dict(quant, sep="/")
  for name, k in layers.items():
    flat[f"{name}/w_bits"] = flat[f"{name}/a_bits"] = bits(k)
  return traverse_util.unflatten_dict(flat, sep="/")


@pytest.mark.parametrize("quantizer", [DoReFa(), LSQ(), PACT()], ids=lambda q: type(q).__name__)
def test_model_bits_change_without_recompiling(quantizer):
  fp_variables, x, fp_logits = _full_precision()
  model = get_model("resnet8", quantizer=quantizer)
  variables = _with_quantizer_params(fp_variables, quantizer)
  assert (jax.tree.structure(variables) ==
          jax.tree.structure(jax.eval_shape(model.init, jax.random.key(0), x[:1])))
  traces = []

  @jax.jit
  def apply(variables, x):
    traces.append(1)  # runs only while tracing
    return model.apply(variables, x, train=False)

  some = _set_bits(variables["quant"], {"stage1_block0/conv1": 4, "stage2_block0/conv2": 4})
  others = _set_bits(some, {"stage1_block0/conv2": 2, "stage3_block0/conv1": 2,
                            "stage2_block0/conv2": 32})
  outputs = [np.asarray(apply({**variables, "quant": q}, x))
             for q in (variables["quant"], some, others)]
  assert len(traces) == 1 and apply._cache_size() == 1
  # A different program, so XLA may fuse the (bit-identical) conv inputs' producers
  # differently: equal to float32 rounding here; bit-exact op by op (next test).
  np.testing.assert_allclose(outputs[0], fp_logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(outputs, outputs[1:]):
    assert np.max(np.abs(a - b)) > 1e-3


@pytest.mark.parametrize("quantizer", [DoReFa(), LSQ(), PACT()], ids=lambda q: type(q).__name__)
def test_model_at_32_bits_is_exactly_full_precision(quantizer):
  fp_variables, x, _ = _full_precision()
  want = get_model("resnet8").apply(fp_variables, x, train=False)  # op by op, no fusion
  got = get_model("resnet8", quantizer=quantizer).apply(
      _with_quantizer_params(fp_variables, quantizer), x, train=False)
  np.testing.assert_array_equal(got, want)


def test_calibrate_lsq_sets_paper_init():
  fp_variables, x, _ = _full_precision()
  model = get_model("resnet8", quantizer=LSQ())
  variables = _with_quantizer_params(fp_variables, LSQ())
  names = [p[:-len("/kernel")] for p in traverse_util.flatten_dict(variables["params"], sep="/")
           if p.endswith("/kernel")]
  variables["quant"] = _set_bits(variables["quant"], {n: 4 for n in names})
  out = traverse_util.flatten_dict(calibrate_lsq(model, variables, x)["params"], sep="/")
  for name in names:
    kernel = np.asarray(out[f"{name}/kernel"], np.float64)
    np.testing.assert_allclose(out[f"{name}/lsq_w_step"], 2 * np.abs(kernel).mean() / np.sqrt(7),
                               rtol=1e-5)
  # The stem reads the image itself: 2 mean|x| / sqrt(2^4 - 1).
  np.testing.assert_allclose(out["stem_conv/lsq_a_step"],
                             2 * np.abs(np.asarray(x, np.float64)).mean() / np.sqrt(15), rtol=1e-5)
  with pytest.raises(UserError, match="no LSQ layers"):
    calibrate_lsq(get_model("resnet8", quantizer=DoReFa()), fp_variables, x)
