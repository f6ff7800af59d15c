"""LoRA (Hu et al. 2021) as a transform over Flax params: adapters, apply, merge.

A Dense layer with kernel ``W`` ``[in, out]`` (Flax's layout: ``y = x @ W + b``)
gets two trainable factors ``A`` ``[in, r]`` and ``B`` ``[r, out]`` and runs with

    W' = W + (alpha / r) * A @ B

``A`` is drawn uniform in ``[-1/sqrt(in), 1/sqrt(in)]`` (what PyTorch's
``kaiming_uniform_(a=sqrt(5))`` gives, as in the PEFT library) and ``B`` starts at
zero, so at initialization the model is exactly the pretrained one.

How it runs. :func:`apply` returns a params pytree in which every target kernel is
replaced by ``W'``; the model is applied unchanged, so any Flax model whose
projections are ``nn.Dense`` layers works without a LoRA-aware layer. The price,
against a layer computing ``x @ W + s * (x @ A) @ B``: the forward materializes
``W'`` (one kernel-sized temporary per target) and the backward forms ``dL/dW'``
before reducing it to ``dA = s * dL/dW' @ B^T`` and ``dB = s * A^T @ dL/dW'``, one
``[in, out]`` product per target and step. The frozen base gets no gradient and no
optimizer state (see :func:`picpq_jax.finetune.peft.make_train_step`), which is the
memory that matters.

Dropout. PEFT's LoRA dropout masks the adapter's input per token, which a weight
transform cannot express. :func:`apply` with ``dropout=p`` and a key instead drops
rows of ``A`` (input features of the adapter path) with probability ``p`` and
scales the rest by ``1 / (1 - p)``: dropout on the adapter's input features with one
mask per layer and step, shared by every token of the batch. It is an unbiased
regularizer of the same kind, not the per-token one.

Adapters pytree: nested dicts at the target modules' paths, ``{"layer_0":
{"attention": {"query": {"lora_a": A, "lora_b": B}}}}``, so it averages, saves and
counts like any params tree. The rank is read from the shapes; ``alpha`` is passed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from picpq_jax.errors import UserError
from picpq_jax.finetune.peft import SEP, Method, Params, flatten, select, unflatten

Array = jax.Array
KERNEL = "kernel"


def _is_dense_kernel(path: str, leaf: Any) -> bool:
  return path.rsplit(SEP, 1)[-1] == KERNEL and len(getattr(leaf, "shape", ())) == 2


def find_targets(params: Params, targets: str) -> list[str]:
  """Module paths (``layer_0/attention/query``) of the 2-D ``kernel`` leaves whose
  module path matches the pattern ``targets`` (``re.search``).

  Raises:
    UserError: nothing matches; the message lists the Dense modules there are.
  """
  dense = [p[: -len(SEP + KERNEL)] for p, leaf in flatten(params).items()
           if _is_dense_kernel(p, leaf)]
  return select(dense, targets, "LoRA target")


def init(key: Array, params: Params, targets: str = "query|value", rank: int = 8,
         dtype: Any = jnp.float32) -> Params:
  """LoRA adapters for the Dense layers matching ``targets``.

  Args:
    key: PRNG key (one split per target, in path order).
    params: the base params (kernels ``[in, out]``; quantized kernels count by shape).
    targets: regex on module paths, e.g. ``"query|value"``.
    rank: ``r``, at least 1 and at most ``min(in, out)`` of every target.
    dtype: the adapters' dtype.

  Returns:
    ``{<module path>: {"lora_a": [in, r] uniform(+-1/sqrt(in)), "lora_b": [r, out]
    zeros}}`` as nested dicts.

  Raises:
    UserError: ``rank`` out of range for some target (named), or no target matched.
  """
  modules = find_targets(params, targets)
  flat = flatten(params)
  if rank < 1:
    raise UserError(f"LoRA rank {rank} must be at least 1")
  out = {}
  for module, k in zip(modules, jax.random.split(key, len(modules))):
    fan_in, fan_out = flat[module + SEP + KERNEL].shape
    if rank > min(fan_in, fan_out):
      raise UserError(f"LoRA rank {rank} is larger than layer {module} ({fan_in}x{fan_out}) "
                      f"allows: use --rank <= {min(fan_in, fan_out)} or leave that layer "
                      "out of the targets")
    bound = 1.0 / (fan_in ** 0.5)
    out[module + SEP + "lora_a"] = jax.random.uniform(k, (fan_in, rank), dtype, -bound, bound)
    out[module + SEP + "lora_b"] = jnp.zeros((rank, fan_out), dtype)
  return unflatten(out)


def _pairs(adapters: Params) -> dict[str, tuple[Array, Array]]:
  flat = flatten(adapters)
  modules = sorted({p.rsplit(SEP, 1)[0] for p in flat})
  return {m: (flat[m + SEP + "lora_a"], flat[m + SEP + "lora_b"]) for m in modules}


def delta(a: Array, b: Array, alpha: float) -> Array:
  """``(alpha / r) * a @ b`` for ``a`` ``[in, r]``, ``b`` ``[r, out]``: ``[in, out]``."""
  return (alpha / a.shape[1]) * (a @ b)


def apply(params: Params, adapters: Params, alpha: float, *, dropout: float = 0.0,
          key: Array | None = None) -> Params:
  """Params with every adapted kernel replaced by ``W + (alpha / r) * A @ B``.

  Args:
    params: base params; a target kernel may be an array or anything
      :func:`picpq_jax.finetune.qlora.dequantize_params` already turned into one.
    adapters: from :func:`init` (trained or not).
    alpha: LoRA's alpha; the scale is ``alpha / r``.
    dropout: probability of dropping each row of ``A`` (see the module docs); used
      only with a ``key``.
    key: PRNG key for dropout; ``None`` = deterministic (evaluation).

  Returns:
    Params of the same structure; adapted kernels have dtype ``promote(W, A)``.
  """
  if not 0.0 <= dropout < 1.0:
    raise UserError(f"LoRA dropout {dropout} must be in [0, 1)")
  flat = flatten(params)
  pairs = _pairs(adapters)
  keys = (jax.random.split(key, len(pairs)) if key is not None and dropout > 0
          else [None] * len(pairs))
  for (module, (a, b)), k in zip(pairs.items(), keys):
    path = module + SEP + KERNEL
    if path not in flat:
      raise UserError(f"adapter for {module} has no kernel {path} in the params: "
                      "were the adapters made for another model?")
    if k is not None:
      keep = jax.random.bernoulli(k, 1.0 - dropout, (a.shape[0], 1))
      a = jnp.where(keep, a / (1.0 - dropout), jnp.zeros_like(a))
    w = flat[path]
    dtype = jnp.promote_types(w.dtype, a.dtype)
    flat[path] = w.astype(dtype) + delta(a, b, alpha).astype(dtype)
  return unflatten(flat)


def merge(params: Params, adapters: Params, alpha: float) -> Params:
  """Export: the adapters folded into the base weights, kernels in their own dtype.

  The merged params run in the unmodified model, with no adapter left; their output
  equals the adapted model's (up to the rounding of the base dtype).
  """
  merged = flatten(apply(params, adapters, alpha))
  base = flatten(params)
  return unflatten({p: v.astype(base[p].dtype) for p, v in merged.items()})


def method(targets: str = "query|value", rank: int = 8, alpha: float = 16.0,
           dropout: float = 0.0, dtype: Any = jnp.float32) -> Method:
  """LoRA as a :class:`~picpq_jax.finetune.peft.Method`: ``frozen`` is the base
  params, ``trainable`` the adapters; ``combine`` applies them (with dropout when
  given a key)."""
  def combine(frozen, adapters, key=None):
    return apply(frozen, adapters, alpha, dropout=dropout, key=key), {}
  return Method("lora", lambda key, params: (params, init(key, params, targets, rank, dtype)),
                combine)
