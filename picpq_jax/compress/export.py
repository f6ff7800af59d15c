"""Export: a model's weights packed to their integer bit-widths, in one file.

For every conv/dense layer with ``w_bits < 32`` the fake-quantized kernel
``quantizer.weights(kernel, w_bits, qparams)`` lies on a symmetric uniform grid,
``w = scale * (q + h)`` with integer codes ``q`` and ``h`` either 0 (a grid through
zero: symmetric uniform, LSQ) or 1/2 (DoReFa's ``2^b`` levels, which skip zero).
:func:`weight_codes` recovers ``q``, one float ``scale`` and ``h`` per layer and
checks that they give back the fake-quantized kernel; :func:`pack_codes` stores
each code in exactly ``b`` bits. Everything else (full-precision layers, biases,
BatchNorm, masks, bit-widths, quantizer parameters) is stored as float32.

File format: an uncompressed ``.npz`` with three entries, written atomically
(temporary file in the same folder, then ``os.replace``):

* ``header``: uint8, UTF-8 JSON: ``format``, ``version``, ``model`` (registry
  name), ``config`` (the model's fields that differ from the registry default,
  e.g. ``num_classes``, ``group_sizes``, ``shortcut_maps``), ``quantizer``
  (``module``, ``name``, dataclass ``fields``) and ``entries``: one per variable in
  ``flatten_dict(variables, sep="/")`` order, ``{"path", "shape", "dtype"}`` and
  either ``"offset"`` (into ``floats``) or, for a packed kernel, ``"bits"``,
  ``"scale"`` (a float32 value), ``"half"`` (``h``), ``"byte_offset"``, ``"nbytes"``
  (into ``codes``).
* ``floats``: float32 ``[N]``, the unpacked variables flattened back to back.
* ``codes``: uint8 ``[M]``, the packed kernels back to back. A kernel of ``n``
  weights at ``b`` bits takes ``ceil(n * b / 8)`` bytes: its codes in the kernel's
  C order, each **offset-binary** ``u = q + 2^(b-1)`` in ``[0, 2^b)``, most
  significant bit first, the bits of consecutive weights contiguous
  (``np.packbits`` of the bit planes).

:func:`load_exported` rebuilds the model with :class:`Prequantized` (weights pass
through, activations quantized by the original quantizer), so its logits are the
fake-quantized model's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import tempfile
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from picpq_jax.errors import UserError
from picpq_jax.models.quantizer import FULL_PRECISION_BITS, Quantizer
from picpq_jax.models.registry import get_model, get_spec

Array = jax.Array
FORMAT, VERSION = "picpq-export", 1
_TRUSTED_MODULE = "picpq_jax."  # quantizer classes rebuilt from a header without asking


@dataclasses.dataclass(frozen=True)
class Prequantized:
  """A quantizer for weights that are already on their grid (an exported model).

  Weights pass through unchanged; activations are quantized by ``base``, whose
  parameters (e.g. a PACT clip) the layers still declare and read.
  """

  base: Quantizer

  def param_inits(self, kernel_shape: tuple[int, ...]) -> Mapping[str, Any]:
    return self.base.param_inits(kernel_shape)

  def weights(self, w: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    del bits, qparams
    return w

  def activations(self, x: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    return self.base.activations(x, bits, qparams)


@dataclasses.dataclass(frozen=True)
class ExportInfo:
  """What :func:`export` wrote."""

  path: str
  file_bytes: int  # size of the file on disk
  float32_bytes: int  # 4 bytes per scalar of every variable: the unpacked size
  packed_layers: tuple[tuple[str, int], ...]  # (layer path, w_bits) of packed kernels

  @property
  def ratio(self) -> float:
    """``file_bytes / float32_bytes``."""
    return self.file_bytes / self.float32_bytes


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
  """Packs integer codes in ``[-2^(b-1), 2^(b-1))`` into ``b`` bits each.

  Args:
    codes: integer array of any shape, read in C order.
    bits: ``b``, 1 to 31.

  Returns:
    uint8 ``[ceil(n * b / 8)]``: offset-binary ``u = q + 2^(b-1)``, MSB first,
    consecutive codes' bits contiguous, zero bits after the last code.
  """
  codes = np.asarray(codes, np.int64).reshape(-1)
  half = 1 << (bits - 1)
  if codes.size and (codes.min() < -half or codes.max() >= half):
    raise UserError(f"codes [{codes.min()}, {codes.max()}] do not fit {bits} bits "
                    f"([-{half}, {half - 1}])")
  shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
  planes = ((codes[:, None] + half) >> shifts) & 1
  return np.packbits(planes.astype(np.uint8).reshape(-1))


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  """Inverse of :func:`pack_codes`: int64 ``[count]`` codes from ``b``-bit packing."""
  planes = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits)
  place = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
  return planes.reshape(count, bits).astype(np.int64) @ place - (1 << (bits - 1))


def _grid_step(levels: np.ndarray, bits: int) -> float:
  """The coarsest ``D`` with ``2 * levels / D`` all integers (``levels`` distinct,
  float64, not all zero): a divisor ``min(S) / m`` of the smallest of
  ``S = {2|levels|} + gaps``, for the first ``m`` that makes every ``S / D`` an
  integer."""
  values = np.concatenate([2 * np.abs(levels[levels != 0]), np.diff(levels)])
  smallest = values.min()
  for m in range(1, 2 ** (min(bits, 12) + 1) + 1):
    ratio = values * m / smallest
    if np.all(np.abs(ratio - np.round(ratio)) < 1e-3 + 1e-6 * ratio):  # float32 rounding
      return smallest / m
  raise UserError("the quantized weights are not on a uniform grid")


def _closest_scale(scale: np.float32, grid: np.ndarray, wq: np.ndarray
                   ) -> tuple[np.float32, float]:
  """Of ``scale`` (positive) and its float32 neighbours, 4 ulps each way, the one
  whose float32 ``scale * grid`` is closest to ``wq`` in max norm, with that error.
  Usually one of them reproduces ``wq`` bit for bit."""
  grid = grid.astype(np.float32)
  ulps = np.arange(-4, 5, dtype=np.int32)
  candidates = (np.asarray(scale, np.float32).view(np.int32) + ulps).view(np.float32)
  errors = [float(np.abs(c * grid - wq).max()) for c in candidates]
  best = int(np.argmin(errors))
  return candidates[best], errors[best]


def weight_codes(wq: np.ndarray, bits: int, name: str = "weights"
                 ) -> tuple[np.ndarray, np.float32, float]:
  """Integer codes of fake-quantized weights on a symmetric uniform grid.

  Finds ``q`` (int64, shape of ``wq``, in ``[-2^(b-1), 2^(b-1))``), a float32
  ``scale`` and ``h`` in {0, 1/2} with ``scale * (q + h) == wq`` to within
  ``1e-6 * max(1, max|wq|)`` (computed in float32), or raises ``UserError``.

  Args:
    wq: the fake-quantized weights (any shape).
    bits: the layer's ``w_bits``.
    name: the layer, for error messages.
  """
  wq = np.asarray(wq, np.float32)
  levels = np.unique(wq.astype(np.float64))
  if np.all(levels == 0):
    return np.zeros(wq.shape, np.int64), np.float32(1.0), 0.0
  if levels.size > 2 ** bits:
    raise UserError(f"{name}: {levels.size} distinct quantized weights do not fit "
                    f"{bits} bits; is the quantizer a uniform one?")
  step = _grid_step(levels, bits)
  twice = np.round(2 * levels / step).astype(np.int64)
  half = 0.5 if twice[0] % 2 else 0.0
  centered = twice / 2  # levels / step = q + h
  step = float(levels @ centered / (centered @ centered))  # least squares on the levels
  codes = np.round(wq.astype(np.float64) / step - half).astype(np.int64)
  lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  if codes.min() < lo or codes.max() > hi:
    raise UserError(f"{name}: codes [{codes.min()}, {codes.max()}] need more than {bits} "
                    "bits; the quantizer's grid is wider than its bit-width")
  scale, error = _closest_scale(np.float32(step), codes + half, wq)
  if error > 1e-6 * max(1.0, float(np.abs(wq).max())):
    raise UserError(f"{name}: integer codes reproduce the quantized weights only to "
                    f"{error:.2e}; the quantizer's weights are not on a uniform grid")
  return codes, scale, half


def _to_json(value: Any) -> Any:
  """Tuples to lists, recursively; raises on what JSON cannot hold."""
  if isinstance(value, (tuple, list)):
    return [_to_json(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise UserError(f"cannot store model setting {value!r} in an export header")


def _from_json(value: Any) -> Any:
  """Lists back to tuples, recursively (module fields must be hashable)."""
  return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def _model_config(model_name: str, model: nn.Module) -> dict[str, Any]:
  """The fields of ``model`` that differ from ``get_model(model_name)``'s, as JSON."""
  reference = get_model(model_name)
  if type(model) is not type(reference):
    raise UserError(f"model is a {type(model).__name__}, but {model_name!r} builds a "
                    f"{type(reference).__name__}; pass the matching model name")
  config = {}
  for field in dataclasses.fields(model):
    if field.name in ("parent", "name", "quantizer"):
      continue
    value = getattr(model, field.name)
    if value != getattr(reference, field.name):
      config[field.name] = _to_json(value)
  return config


def _describe(quantizer: Quantizer) -> dict[str, Any]:
  """Where a quantizer's class lives and its dataclass fields (``None`` if not JSON)."""
  cls = type(quantizer)
  fields = None
  if dataclasses.is_dataclass(quantizer):
    with contextlib.suppress(UserError):
      fields = {f.name: _to_json(getattr(quantizer, f.name))
                for f in dataclasses.fields(quantizer)}
  return {"module": cls.__module__, "name": cls.__qualname__, "fields": fields}


def _rebuild_quantizer(description: Mapping[str, Any]) -> Quantizer:
  """The quantizer a header describes, if its class is one of picpq_jax's."""
  where = f"{description['module']}.{description['name']}"
  if not description["module"].startswith(_TRUSTED_MODULE) or description["fields"] is None:
    raise UserError(f"the file was exported with quantizer {where}, which load_exported "
                    "does not rebuild by itself; pass quantizer=")
  cls = getattr(importlib.import_module(description["module"]), description["name"])
  return cls(**{k: _from_json(v) for k, v in description["fields"].items()})


def _check_fits(model: nn.Module, input_shape: tuple[int, ...], flat: Mapping[str, Any]) -> None:
  """Raises unless ``flat`` (``'/'``-joined paths) has exactly ``model``'s variables."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  abstract = traverse_util.flatten_dict(
      jax.eval_shape(model.init, jax.random.key(0), x), sep="/")
  wrong = sorted(set(abstract) ^ set(flat))
  wrong += [p for p in sorted(set(abstract) & set(flat))
            if tuple(np.shape(flat[p])) != abstract[p].shape]
  if wrong:
    raise UserError(f"the variables do not fit the model (e.g. {wrong[:3]}); pass the model "
                    "and quantizer they were made with")


def _resolve_model(model_name: str, variables: Mapping[str, Any], quantizer: Quantizer,
                   model: nn.Module | None) -> nn.Module:
  """``model``, or the registry's ``model_name`` with the variables' head width."""
  if model is not None:
    if model.quantizer != quantizer:
      raise UserError(f"model.quantizer is {model.quantizer!r} but export got {quantizer!r}; "
                      "pass the quantizer the model was trained with")
    return model
  head = variables["params"]["head"]["kernel"]
  return get_model(model_name, num_classes=int(np.shape(head)[-1]), quantizer=quantizer)


def _layer_bits(flat: Mapping[str, Any]) -> dict[str, int]:
  """``{layer path: w_bits}`` of layers to pack (``1 <= w_bits < 32``)."""
  bits = {}
  for path, value in flat.items():
    if path.startswith("quant/") and path.endswith("/w_bits"):
      b = int(np.asarray(value))
      if b < 1:
        raise UserError(f"{path} is {b}; bit-widths must be at least 1")
      if b < FULL_PRECISION_BITS:
        bits[path[len("quant/"):-len("/w_bits")]] = b
  return bits


def _packed_entry(layer: str, flat: Mapping[str, Any], bits: int, quantizer: Quantizer,
                  byte_offset: int) -> tuple[dict[str, Any], np.ndarray]:
  """Header entry and packed bytes of one layer's fake-quantized kernel."""
  prefix = f"params/{layer}/"
  qparams = {p[len(prefix):]: jnp.asarray(v) for p, v in flat.items()
             if p.startswith(prefix) and p[len(prefix):] not in ("kernel", "bias")}
  kernel = flat[prefix + "kernel"]
  wq = quantizer.weights(jnp.asarray(kernel), jnp.asarray(bits, jnp.int32), qparams)
  codes, scale, half = weight_codes(np.asarray(wq), bits, name=layer)
  packed = pack_codes(codes, bits)
  entry = {"path": prefix + "kernel", "shape": list(np.shape(kernel)), "dtype": "float32",
           "bits": bits, "scale": float(scale), "half": half,
           "byte_offset": byte_offset, "nbytes": int(packed.size)}
  return entry, packed


def _write_atomically(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """``np.savez`` to a temporary file beside ``path``, fsync, then ``os.replace``."""
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise UserError(f"cannot export to {path}: folder {folder} does not exist; create it")
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def export(path: str | os.PathLike, model_name: str, variables: Mapping[str, Any],
           quantizer: Quantizer, *, model: nn.Module | None = None,
           input_shape: tuple[int, ...] | None = None) -> ExportInfo:
  """Writes ``variables`` with every quantized kernel packed to its ``w_bits``.

  Args:
    path: the file to write (``.npz`` by convention); replaced atomically.
    model_name: registry name (:data:`picpq_jax.models.MODELS`).
    variables: ``{"params", "batch_stats", "masks", "quant"}`` of the model.
    quantizer: the quantizer the model was trained with; its ``weights`` gives the
      kernels that are packed (layers with ``w_bits < 32``).
    model: the model, when it is not ``get_model(model_name, num_classes, quantizer)``
      (e.g. the result of :func:`picpq_jax.compress.compact`).
    input_shape: one example's shape for checking the variables (default: the
      registry's).

  Returns:
    :class:`ExportInfo`: the path, file size and float32 size.
  """
  path = os.fspath(path)
  model = _resolve_model(model_name, variables, quantizer, model)
  flat = {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(dict(variables), sep="/").items()}
  _check_fits(model, input_shape or get_spec(model_name).input_shape, flat)
  bits = _layer_bits(flat)
  entries, floats, codes, float_offset, byte_offset = [], [], [], 0, 0
  for name, value in flat.items():
    layer = name[len("params/"):-len("/kernel")]
    if name.startswith("params/") and name.endswith("/kernel") and layer in bits:
      entry, packed = _packed_entry(layer, flat, bits[layer], quantizer, byte_offset)
      codes.append(packed)
      byte_offset += packed.size
    else:
      entry = {"path": name, "shape": list(value.shape), "dtype": str(value.dtype),
               "offset": float_offset}
      floats.append(value.astype(np.float32).reshape(-1))
      float_offset += value.size
    entries.append(entry)
  header = {"format": FORMAT, "version": VERSION, "model": model_name,
            "config": _model_config(model_name, model), "quantizer": _describe(quantizer),
            "entries": entries}
  _write_atomically(path, {
      "header": np.frombuffer(json.dumps(header, separators=(",", ":")).encode(), np.uint8),
      "floats": np.concatenate(floats) if floats else np.zeros(0, np.float32),
      "codes": np.concatenate(codes) if codes else np.zeros(0, np.uint8)})
  return ExportInfo(path, os.path.getsize(path), 4 * sum(v.size for v in flat.values()),
                    tuple(bits.items()))


def load_exported(path: str | os.PathLike, quantizer: Quantizer | None = None
                  ) -> tuple[nn.Module, dict]:
  """Reads a file written by :func:`export`.

  Args:
    path: the exported file.
    quantizer: the activation quantizer (default: rebuilt from the header, for the
      quantizers of :mod:`picpq_jax`).

  Returns:
    ``(model, variables)``: the model with ``Prequantized(quantizer)`` (packed
    kernels are already quantized: ``scale * (q + h)``, float32) and its variables
    (``quant`` as int32), whose logits are the exported model's.
  """
  try:
    with np.load(os.fspath(path), allow_pickle=False) as f:
      header = json.loads(f["header"].tobytes().decode())
      floats, codes = f["floats"], f["codes"]
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"cannot read {path} as a picpq export ({e}); export it again") from None
  if header.get("format") != FORMAT or header.get("version") != VERSION:
    raise UserError(f"{path} is not a {FORMAT} v{VERSION} file; export it again")
  base = quantizer if quantizer is not None else _rebuild_quantizer(header["quantizer"])
  config = {k: _from_json(v) for k, v in header["config"].items()}
  model = get_model(header["model"], quantizer=Prequantized(base)).clone(**config)
  flat = {}
  for e in header["entries"]:
    shape = tuple(e["shape"])
    if "bits" in e:
      packed = codes[e["byte_offset"]:e["byte_offset"] + e["nbytes"]]
      if packed.size != e["nbytes"]:
        raise UserError(f"{path} is truncated at {e['path']}; export it again")
      q = unpack_codes(packed, e["bits"], int(np.prod(shape)))
      value = np.float32(e["scale"]) * (q + e["half"]).astype(np.float32)
    else:
      value = floats[e["offset"]:e["offset"] + int(np.prod(shape))]
    if value.size != int(np.prod(shape)):
      raise UserError(f"{path} is truncated at {e['path']}; export it again")
    flat[e["path"]] = jnp.asarray(value.reshape(shape).astype(e["dtype"]))
  return model, dict(traverse_util.unflatten_dict(flat, sep="/"))
