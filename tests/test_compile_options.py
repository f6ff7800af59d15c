"""The library's XLA options: XLA's own by default; an opt-in set only where its
gradient check passes on this machine; gradients against a float64 reference; an
option this XLA rejects falls back to the defaults instead of failing every program."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from picpq_jax import compile_options
from picpq_jax.errors import UserError

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")


def _conv_relu_sum(x, w):
  y = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(jax.nn.relu(y) ** 2)


def _args():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(4, 8, 8, 16)), jnp.float32),
          jnp.asarray(rng.normal(size=(3, 3, 16, 16)) * 0.1, jnp.float32))


@pytest.mark.parametrize("name", sorted(compile_options.OPTION_SETS))
def test_conv_gradient_with_each_option_set_equals_numpy(name):
  options = compile_options.OPTION_SETS[name] or None
  grad = jax.jit(jax.grad(_conv_relu_sum, argnums=(0, 1)), compiler_options=options)
  args = _args()
  x, w = map(np.asarray, args)  # numpy: y = sum over taps of shifted x @ w[i, j]
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(xp[:, i:i + 8, j:j + 8] @ w[i, j] for i in range(3) for j in range(3))
  dy = 2 * np.maximum(y, 0)
  dw = np.stack([np.stack([np.einsum("nhwc,nhwo->co", xp[:, i:i + 8, j:j + 8], dy)
                           for j in range(3)]) for i in range(3)])
  np.testing.assert_allclose(np.asarray(grad(*args)[1]), dw, rtol=1e-4, atol=1e-4)


def test_an_option_this_xla_rejects_falls_back_to_the_defaults(monkeypatch):
  monkeypatch.setitem(compile_options.OPTION_SETS, "bogus", {"xla_cpu_no_such_option": "1"})
  monkeypatch.setenv(compile_options.ENV, "bogus")
  assert compile_options.compiler_options() is None
  assert float(compile_options.jit(_conv_relu_sum)(*_args())) > 0


@pytest.mark.parametrize("extensions, name", [(["AVX2"], "xla"), ([], "xla"),
                                              (["AVX2", "AVX-512"], "ynn-reduce"),
                                              (["AVX2", "AVX-512", "AVX-512-BF16"], "ynn-reduce")])
def test_the_default_set_follows_the_cpu(monkeypatch, extensions, name):
  monkeypatch.delenv(compile_options.ENV, raising=False)
  monkeypatch.setattr(compile_options, "vector_extensions", lambda: extensions)
  assert compile_options.selected() == name


def test_xla_s_own_set_passes_no_options(monkeypatch):
  monkeypatch.setenv(compile_options.ENV, "xla")
  assert compile_options.compiler_options() is None


def test_an_unknown_option_set_is_a_one_line_user_error(monkeypatch):
  monkeypatch.setenv(compile_options.ENV, "fast")
  with pytest.raises(UserError, match="PICPQ_XLA_CPU_OPTIONS='fast'.*ynn-reduce"):
    compile_options.compiler_options()


@pytest.mark.parametrize("error, used", [(2.4e-2, False), (2e-6, True)])
def test_a_set_is_used_only_where_its_check_passed(monkeypatch, tmp_path, error, used):
  """``ynn-reduce`` compiles the programs only where :func:`gradient_error` on this
  machine is within tolerance; otherwise a warning names the error. The check runs
  once: its result is read back from the cache."""
  monkeypatch.setenv(compile_options.ENV, "ynn-reduce")
  monkeypatch.setenv("PICPQ_CACHE", str(tmp_path))
  calls = []
  monkeypatch.setattr(compile_options, "gradient_error", lambda options: calls.append(1) or error)
  compile_options.accurate_here.cache_clear()
  try:
    for _ in range(2):
      if used:
        assert compile_options.compiler_options() == compile_options.OPTION_SETS["ynn-reduce"]
      else:
        with pytest.warns(RuntimeWarning, match="2.4e-02 off float64"):
          assert compile_options.compiler_options() is None
      compile_options.accurate_here.cache_clear()  # a new process: reads the file
  finally:
    compile_options.accurate_here.cache_clear()
  assert len(calls) == 1
  assert list(json.loads((tmp_path / compile_options.CHECK_FILE).read_text()).values()) == [error]


def test_vector_extensions_from_cpuinfo_flags():
  avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
  bf16 = "flags\t\t: avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
  amx = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
  assert compile_options.vector_extensions(avx2) == ["AVX2"]
  assert compile_options.vector_extensions(bf16) == ["AVX2", "AVX-512", "AVX-512-BF16"]
  assert compile_options.vector_extensions(amx) == ["AVX2", "AVX-512", "AVX-512-BF16", "AMX"]
  assert compile_options.vector_extensions("model name: x\n") == []


def test_gradients_with_the_library_options_match_float64():
  """Train-mode (batch statistics) gradients of a whole network compiled with this
  CPU's default option set, against the network in float64; no fallback, so a set
  that fails here fails the test. The network is ResNet-8's layers with tanh for
  ReLU: with ReLU, one float32 ulp of input moves the float64 gradient by up to
  2.4e-2 (a kink flips), which measures luck, not kernels. Measured: 2-3e-6 with
  either set on AVX-512 and AVX2; XLA with no YNNPACK fusion 3-4e-5, bf16 2.5e-2."""
  name = compile_options.default_set(compile_options.vector_extensions())
  error = compile_options.gradient_error(compile_options.OPTION_SETS[name] or None)
  assert error <= compile_options.GRADIENT_TOLERANCE


def test_the_float64_reference_computes_in_float64():
  """The reference of :func:`gradient_error` must not round its products to
  float32 (a float32 conv inside the "float64" model made it share the float32
  program's rounding)."""
  model = compile_options.SmoothResNet8(dtype=jnp.float64)
  with jax.enable_x64(True):
    x = jnp.ones((1, 32, 32, 3), jnp.float64)
    variables = model.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, mutable=["batch_stats"]))(variables)
  products = [e for e in jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
  assert products and all(e.outvars[0].aval.dtype == jnp.float64 for e in products)


@pytest.mark.parametrize("extensions, emulated", [(["AVX2"], True),
                                                  (["AVX2", "AVX-512"], True),
                                                  (["AVX2", "AVX-512", "AVX-512-BF16"], False),
                                                  (["AVX2", "AVX-512", "AMX"], False)])
def test_bf16_on_a_cpu_without_bf16_products_warns(monkeypatch, extensions, emulated):
  monkeypatch.setattr(compile_options, "vector_extensions", lambda: extensions)
  compile_options.warn_if_bf16_emulated.cache_clear()
  try:
    if emulated:
      with pytest.warns(RuntimeWarning, match="emulated on this CPU"):
        assert compile_options.warn_if_bf16_emulated()
    else:
      assert not compile_options.warn_if_bf16_emulated()
  finally:
    compile_options.warn_if_bf16_emulated.cache_clear()
