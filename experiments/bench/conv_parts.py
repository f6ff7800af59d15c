"""Workload 6: where a train step's convolution time goes, part by part.

Every distinct convolution of a network (input size, channels, kernel, stride) is
timed alone in its three parts at the step's batch: the forward pass, the input
gradient (``dgrad``) and the weight gradient (``wgrad``), in JAX
(:func:`picpq_jax.models.layers.conv2d`, its gradients by ``jax.linear_transpose``,
each jitted) and in PyTorch (``F.conv2d`` and ``aten.convolution_backward`` with one
output requested). Each part's time times the number of layers of that shape, summed
over the network, is what a train step spends in that part if nothing else ran:
comparing the two frameworks' sums separates the convolution kernels themselves
from how the whole step is laid out and fused (the ``step`` workload). ``jax`` is
compiled with the library's XLA options for this CPU
(:mod:`picpq_jax.compile_options`), ``jax+xla`` with XLA's defaults (results saved
before 2026-12-06 name them ``jax+ynn``). With PyTorch,
each JAX part's result is also checked against PyTorch's (``max_rel_diff_vs_torch``).
``jax+bf16`` is ``jax`` with bfloat16 operands and results (the issue's "bf16
inputs with fp32 accumulation" on an AVX-512-BF16 CPU): it shows whether XLA:CPU's
bf16 convolutions are faster than its float32 ones; its results differ from
PyTorch's float32 by bf16 rounding (about 1e-2 of the largest entry).

All variants of one shape are timed round-robin in one process
(:func:`experiments.bench.step_time.measure_round_robin`).
"""

from __future__ import annotations

import collections
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import common, setups
from experiments.bench.step_time import measure_round_robin
from picpq_jax.models import layers

PARTS = ("fwd", "dgrad", "wgrad")
ConvShape = tuple[int, int, int, int, int]  # (in H = W, in channels, out channels, kernel, stride)


def conv_shapes(structure) -> dict[ConvShape, int]:
  """``{(hw, c_in, c_out, k, stride): number of layers}`` of the square, dense
  (ungrouped) convolutions of ``structure``, in first-seen order."""
  counts: dict[ConvShape, int] = collections.Counter()
  for l in structure.layers:
    if l.kind == "conv" and l.feature_group_count == 1:
      counts[(l.in_hw[0], l.in_features, l.out_features, l.kernel_size[0], l.strides[0])] += 1
  return dict(counts)


def _padding(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((k // 2, k // 2), (k // 2, k // 2))


def operands(shape: ConvShape, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Random float32 ``(x [B, H, W, C_in], kernel [k, k, C_in, C_out], g [B, H', W',
  C_out])``: the input, the kernel and an output gradient of one conv."""
  hw, cin, cout, k, s = shape
  rng = np.random.default_rng(0)
  out_hw = (hw + 2 * (k // 2) - k) // s + 1
  return (rng.standard_normal((batch, hw, hw, cin), dtype=np.float32),
          rng.standard_normal((k, k, cin, cout), dtype=np.float32) * 0.1,
          rng.standard_normal((batch, out_hw, out_hw, cout), dtype=np.float32))


# JAX variants of each part: name -> (option set, None for the library's; operand dtype).
JAX_FRAMEWORKS = {"jax": (None, jnp.float32), "jax+xla": ("xla", jnp.float32),
                  "jax+bf16": (None, jnp.bfloat16)}


def jax_parts(shape: ConvShape, x, w, g, option_set: str | None = None,
              dtype=jnp.float32) -> dict[str, Callable[[], np.ndarray]]:
  """``{part: fn}``: one conv's forward, input and weight gradient in JAX, each
  returning its result (NHWC, NHWC, HWIO) once computed; compiled with the library's
  XLA options (:mod:`picpq_jax.compile_options`) or the named ``option_set``.
  The operands are cast to ``dtype`` once, outside the timed calls, and the results
  come out in ``dtype``."""
  _, _, _, k, s = shape
  x, w, g = (jnp.asarray(a, dtype) for a in (x, w, g))
  conv = functools.partial(layers.conv2d, strides=(s, s), padding=_padding(k))
  jit = functools.partial(jax.jit, compiler_options=setups.compiler_options(option_set))
  fwd = jit(conv)
  dgrad = jit(lambda w, g: jax.linear_transpose(lambda x: conv(x, w), x)(g)[0])
  wgrad = jit(lambda x, g: jax.linear_transpose(lambda w: conv(x, w), w)(g)[0])
  return {"fwd": lambda: jax.block_until_ready(fwd(x, w)),
          "dgrad": lambda: jax.block_until_ready(dgrad(w, g)),
          "wgrad": lambda: jax.block_until_ready(wgrad(x, g))}


def torch_parts(shape: ConvShape, x, w, g) -> dict[str, Callable[[], np.ndarray]]:
  """The same conv in PyTorch (NCHW, OIHW, no autograd graph), each part returning
  its result in JAX's layout (NHWC, NHWC, HWIO) for the cross-check; the timed
  calls convert nothing (see :func:`run`)."""
  import torch
  _, _, _, k, s = shape
  x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  w = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
  g = torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2)))
  pad = k // 2
  backward = torch.ops.aten.convolution_backward

  def fwd():
    with torch.no_grad():
      return torch.nn.functional.conv2d(x, w, stride=s, padding=pad)

  def part(index):
    mask = [i == index for i in range(3)]
    with torch.no_grad():
      return backward(g, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1, mask)[index]

  return {"fwd": fwd, "dgrad": functools.partial(part, 0), "wgrad": functools.partial(part, 1)}


def _torch_to_jax_layout(part: str, t) -> np.ndarray:
  return t.numpy().transpose((2, 3, 1, 0) if part == "wgrad" else (0, 2, 3, 1))


def max_rel_diff(jax_fns: dict, torch_fns: dict) -> dict[str, float]:
  """``{part: max |jax - torch| / max |torch|}``: JAX's parts against PyTorch's,
  an independent implementation of the same three products."""
  out = {}
  for part in PARTS:
    want = _torch_to_jax_layout(part, torch_fns[part]())
    got = np.asarray(jax_fns[part](), np.float32)
    out[part] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
  return out


def run(cfg) -> dict:
  """Times every conv shape of ``cfg.conv_model`` at ``cfg.conv_batch``, part by part."""
  load_start = common.loadavg()
  arch, batch = cfg.conv_model, cfg.conv_batch
  _, _, structure = setups.jax_model(arch)
  rows = []
  for shape, count in conv_shapes(structure).items():
    ops = operands(shape, batch)
    fns = {(fw, p): f for fw, (option_set, dtype) in JAX_FRAMEWORKS.items()
           for p, f in jax_parts(shape, *ops, option_set=option_set, dtype=dtype).items()}
    diff = {}
    if cfg.use_torch:
      tfns = torch_parts(shape, *ops)
      diff = {fw: max_rel_diff({p: fns[(fw, p)] for p in PARTS}, tfns) for fw in JAX_FRAMEWORKS}
      fns.update({("torch", p): f for p, f in tfns.items()})
    stats = measure_round_robin(fns, warmup=max(cfg.warmup, 1), reps=cfg.conv_reps)
    hw, cin, cout, k, s = shape
    flops = 2.0 * ops[2].size * cin * k * k  # 2 * (output entries) * (taps per entry)
    for (framework, part), st in stats.items():
      rows.append({"model": arch, "batch": batch, "hw": hw, "c_in": cin, "c_out": cout,
                   "kernel": k, "stride": s, "layers": count, "framework": framework,
                   "part": part, **st, "gflops_per_s": flops / st["median_s"] / 1e9,
                   "max_rel_diff_vs_torch": diff[framework][part] if framework in diff
                                            else None})
    print(f"conv {hw}x{hw} {cin}->{cout} k{k} s{s} x{count}: " + ", ".join(
        f"{fw} {p} {1e3 * st['median_s']:.2f} ms" for (fw, p), st in stats.items()), flush=True)
  config = {"model": arch, "batch": batch, "reps": cfg.conv_reps, "warmup": cfg.warmup}
  res = common.result("conv_parts", config, rows, load_start)
  print(table(res), flush=True)
  return res


def totals(rows: list[dict]) -> dict[tuple[str, str], float]:
  """``{(framework, part): seconds}``: each shape's median times its layer count, summed."""
  out: dict[tuple[str, str], float] = collections.defaultdict(float)
  for r in rows:
    out[(r["framework"], r["part"])] += r["layers"] * r["median_s"]
  return dict(out)


def table(res: dict) -> str:
  """Markdown table: per shape and part, JAX and PyTorch in ms and their ratio; then
  the network's sums per part."""
  rows, c = res["rows"], res["config"]
  by = {(r["hw"], r["c_in"], r["c_out"], r["kernel"], r["stride"], r["framework"], r["part"]): r
        for r in rows}
  frameworks = sorted({r["framework"] for r in rows})
  lines = []
  for key in dict.fromkeys(k[:5] for k in by):
    hw, cin, cout, k, s = key
    count = by[(*key, "jax", "fwd")]["layers"]
    for part in PARTS:
      ms = {fw: 1e3 * by[(*key, fw, part)]["median_s"] for fw in frameworks}
      ratio = f"{ms['jax'] / ms['torch']:.2f}" if "torch" in ms else "-"
      lines.append([f"{hw}x{hw}, {cin} -> {cout}, {k}x{k}/{s}", count, part,
                    *(f"{ms[fw]:.2f}" for fw in frameworks), ratio])
  sums = totals(rows)
  for part in (*PARTS, "all"):
    parts = PARTS if part == "all" else (part,)
    ms = {fw: 1e3 * sum(sums[(fw, p)] for p in parts) for fw in frameworks}
    ratio = f"{ms['jax'] / ms['torch']:.2f}" if "torch" in ms else "-"
    lines.append(["**network sum**", "", part, *(f"{ms[fw]:.0f}" for fw in frameworks), ratio])
  return common.markdown_table(
      f"Convolutions of {c['model']} at batch {c['batch']}, each part alone (ms, median of "
      f"{c['reps']}; sums: times the layer count)",
      ["conv (input, channels, kernel/stride)", "layers", "part",
       *(f"{fw} ms" for fw in frameworks), "jax / torch"], lines)
