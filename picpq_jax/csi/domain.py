"""The CSI representation of CsiNet (Wen et al. 2018) and how it is scaled.

A downlink channel of a ``Nt = 32`` antenna ULA at the BTS over ``Nc = 1024``
subcarriers is the complex matrix ``H_sf [Nt, Nc]`` (spatial-frequency). The field
works on its angular-delay form: a DFT over the antennas (angle) and an inverse DFT
over the subcarriers (delay), both orthonormal here, then only the first 32 delay
taps are kept (the multipath delay spread of an indoor channel fits in them):
``H_ad [32 angle, 32 delay]`` complex.

Layout. CsiNet's reference code holds a sample as ``[2, 32, 32]`` (channels-first:
real part, then imaginary part; rows = angle, columns = delay, which is why its rho
computation pads and FFTs the *last* axis). This library is NHWC: ``[32, 32, 2]`` =
``transpose(1, 2, 0)`` of the reference layout, i.e. ``x[a, d, 0] = Re H_ad[a, d]``
and ``x[a, d, 1] = Im H_ad[a, d]``.

Scaling. The COST2100 files store values in [0, 1] with 0.5 meaning zero; the
scale used to make them is not published. The generator here scales each sample by
its largest real or imaginary magnitude (``normalize="sample"``, the default):
``x = 0.5 + H_ad / (2 * max(|Re H_ad|, |Im H_ad|))``, so every sample spans [0, 1]
and NMSE (a per-sample ratio) is unaffected; ``normalize="dataset"`` uses one
maximum over the whole array instead (keeps the path-loss differences between
samples). Metrics always subtract 0.5 first, as the reference code does.
"""

from __future__ import annotations

import numpy as np

ANTENNAS = 32
SUBCARRIERS = 1024
DELAY_ROWS = 32
CODE_SIZE = 2 * ANTENNAS * DELAY_ROWS  # 2048 real values per sample
RHO_FFT = 257  # rho: delay axis zero-padded to this many points ...
RHO_CARRIERS = 125  # ... and the first this many FFT bins kept (CsiNet's reference)
NORMALIZATIONS = ("sample", "dataset")


def angular_delay(h_sf: np.ndarray, delay_rows: int = DELAY_ROWS) -> np.ndarray:
  """Spatial-frequency channels ``[N, Nt, Nc]`` -> angular-delay ``[N, Nt, delay_rows]``.

  Orthonormal DFT over antennas (axis 1) and orthonormal inverse DFT over
  subcarriers (axis 2; a path of delay ``tau`` lands on tap ``tau * bandwidth``),
  then the first ``delay_rows`` taps. Complex128 in, complex128 out.
  """
  h = np.fft.fft(h_sf, axis=1, norm="ortho")
  h = np.fft.ifft(h, axis=2, norm="ortho")
  return h[:, :, :delay_rows]


def to_unit_range(h_ad: np.ndarray, normalize: str = "sample") -> np.ndarray:
  """Complex ``[N, 32, 32]`` -> float32 NHWC ``[N, 32, 32, 2]`` in [0, 1], 0.5 = zero.

  ``normalize``: ``"sample"`` divides each sample by twice its largest real or
  imaginary magnitude, ``"dataset"`` by twice the largest over all samples (see the
  module docstring). An all-zero sample maps to 0.5 everywhere.
  """
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
  parts = np.stack([h_ad.real, h_ad.imag], axis=-1)
  axes = tuple(range(1, parts.ndim)) if normalize == "sample" else None
  peak = np.max(np.abs(parts), axis=axes, keepdims=True)
  scaled = parts / (2.0 * np.where(peak > 0, peak, 1.0))
  return np.clip(0.5 + scaled, 0.0, 1.0).astype(np.float32)


def to_complex(x: np.ndarray) -> np.ndarray:
  """NHWC ``[N, 32, 32, 2]`` in [0, 1] -> complex ``[N, 32, 32]`` centred (``x - 0.5``)."""
  x = np.asarray(x, np.float64) - 0.5
  return x[..., 0] + 1j * x[..., 1]


def frequency_response(x: np.ndarray) -> np.ndarray:
  """The ``HF`` that rho compares against, from NHWC ``[N, 32, 32, 2]`` in [0, 1].

  As CsiNet's reference code treats a reconstruction: centre (``- 0.5``), zero-pad
  the delay axis to :data:`RHO_FFT` points, FFT over it, keep the first
  :data:`RHO_CARRIERS` bins: complex ``[N, 32, 125]``. The generator stores this as
  its ``HF`` (the truncated channel's response), so rho measures reconstruction
  error only, not the truncation to 32 taps.
  """
  h = to_complex(x)
  pad = np.zeros((*h.shape[:2], RHO_FFT - h.shape[2]), h.dtype)
  return np.fft.fft(np.concatenate([h, pad], axis=2), axis=2)[:, :, :RHO_CARRIERS]
