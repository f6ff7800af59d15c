"""CSI data from quadriga-lib's IEEE TGn indoor models, configured like COST2100 indoor.

COST2100 (CsiNet's benchmark) is not reachable here, so this module makes data of
the same form from an established channel model: ``quadriga_lib`` (the QuaDRiGa
channel model, Apache-2.0), ``channel.get_ieee_indoor`` (IEEE 802.11 TGn models A-F
at 5.25 GHz) with a 32-element half-wavelength ULA of omni elements at the BTS
(``arrayant.generate("ula", N=32)``) and one omni antenna at the UE, the response on
1024 subcarriers over 20 MHz (``channel.baseband_freq_response``; the bandwidth is
our choice: CsiNet does not state one), then :func:`~picpq_jax.csi.domain.angular_delay`
and :func:`~picpq_jax.csi.domain.to_unit_range`.

Non-IID by physics. Each UE ``u`` has its own :class:`UeScenario`: a TGn model
(cycling B, C, D, E, F: model A is a single flat tap), a distance to the BTS and a
direction (azimuth offset of departure). A UE's samples are independent channel
realizations (fresh seeds) with its position jittered by +-10 % in distance and
+-5 degrees in direction (the UE moves around its spot), so UEs differ in delay
spread, angular spread, K-factor and direction, not by a random split.

Generation runs in worker processes (one task = a chunk of one UE's samples, its
own seed from ``SeedSequence([seed, ue, chunk])``, so the result does not depend
on the number of workers), shows a progress bar, and is cached as ``.npy`` under
``$PICPQ_CACHE/csi`` keyed by every setting and the installed quadriga-lib version.

Rate, measured on this project's 2 shared CPU cores (load 3-5): 16 samples/s in one
process and 26 with 2 workers for TGn B and C; 14 samples/s with 2 workers over
B-F, where ``get_ieee_indoor`` itself dominates (about 47 ms per link for model F,
6 ms for B; the frequency response 5-12 ms, the transforms 1-2 ms). Samples scale
with workers (each chunk is independent).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np

from picpq_jax.csi.domain import ANTENNAS, NORMALIZATIONS, SUBCARRIERS, angular_delay, to_unit_range
from picpq_jax.errors import UserError

TGN_MODELS = ("B", "C", "D", "E", "F")
CARRIER_HZ = 5.25e9
BANDWIDTH_HZ = 20e6
CHUNK = 32  # samples per quadriga call (one call places CHUNK users)
FORMAT_VERSION = 1  # bump when the generated values change, to invalidate caches


@dataclasses.dataclass(frozen=True)
class UeScenario:
  """Where one UE is and which TGn model its channel follows."""

  model: str  # TGn model letter, one of TGN_MODELS
  distance_m: float  # distance to the BTS
  azimuth_deg: float  # direction of departure seen from the BTS array


def ue_scenarios(num_ues: int, seed: int) -> tuple[UeScenario, ...]:
  """``num_ues`` scenarios: models cycle through :data:`TGN_MODELS`, distances uniform
  in [3, 30] m and azimuths uniform in [-60, 60] degrees, drawn from ``seed``."""
  rng = np.random.default_rng([seed, 0x5CE7])
  return tuple(UeScenario(TGN_MODELS[u % len(TGN_MODELS)],
                          float(rng.uniform(3.0, 30.0)), float(rng.uniform(-60.0, 60.0)))
               for u in range(num_ues))


def _arrays():
  from quadriga_lib import arrayant
  bts = arrayant.generate("ula", res=10, freq=CARRIER_HZ, N=ANTENNAS, spacing=0.5)
  ue = arrayant.generate("omni", res=10, freq=CARRIER_HZ)
  return bts, ue


def _chunk(scenario: UeScenario, count: int, seed: int) -> np.ndarray:
  """``count`` spatial-frequency channels of one UE: complex128 ``[count, 32, 1024]``."""
  from quadriga_lib import channel
  rng = np.random.default_rng(seed)
  dist = scenario.distance_m * rng.uniform(0.9, 1.1, count)
  # quadriga's 4 offset-angle rows: row 0 places the UE at that azimuth, row 1 offsets
  # the departure angles (it is row 1 that moves the angular peak; measured).
  offsets = np.zeros((4, count))
  offsets[0] = offsets[1] = scenario.azimuth_deg + rng.uniform(-5.0, 5.0, count)
  bts, ue = _arrays()
  links = channel.get_ieee_indoor(bts, ue, scenario.model, CarrierFreq_Hz=CARRIER_HZ,
                                  n_users=count, Dist_m=dist, offset_angles=offsets,
                                  seed=int(rng.integers(1, 2**31 - 1)))
  out = np.empty((count, ANTENNAS, SUBCARRIERS), np.complex128)
  for i, link in enumerate(links):
    # [rx 1, tx 32, carriers, snapshots 1] -> [32, 1024]
    out[i] = channel.baseband_freq_response(link["coeff"], link["delay"], BANDWIDTH_HZ,
                                            SUBCARRIERS)[0, :, :, 0]
  return out


def _task(args: tuple) -> tuple[int, int, np.ndarray]:
  """Worker: one chunk of one UE -> (ue, start, float32 angular-delay [count, 32, 32, 2])."""
  ue, start, scenario, count, seed, normalize = args
  h_ad = angular_delay(_chunk(scenario, count, seed))
  # "dataset" scaling needs every sample: keep complex parts unscaled until the end.
  parts = np.stack([h_ad.real, h_ad.imag], -1).astype(np.float32)
  return ue, start, to_unit_range(h_ad, "sample") if normalize == "sample" else parts


def cache_path(cache_dir: str | os.PathLike, settings: dict) -> Path:
  """``<cache_dir>/csi/quadriga-<hash of settings>.npy``."""
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  return Path(cache_dir) / "csi" / f"quadriga-{key}.npy"


def generate(num_ues: int, samples_per_ue: int, seed: int = 0, normalize: str = "sample",
             cache_dir: str | os.PathLike | None = None, workers: int | None = None,
             progress: bool = True) -> tuple[np.ndarray, tuple[UeScenario, ...]]:
  """Per-UE CSI: float32 NHWC ``[num_ues, samples_per_ue, 32, 32, 2]`` in [0, 1].

  Args:
    num_ues: UEs, each with its own :class:`UeScenario` (see :func:`ue_scenarios`).
    samples_per_ue: channel realizations per UE.
    seed: the only source of randomness; equal settings give equal arrays. It
      also places the UEs, so a held-out test set of the *same* UEs is a slice of
      the sample axis (samples are independent realizations), not another seed.
    normalize: ``"sample"`` or ``"dataset"`` (:func:`~picpq_jax.csi.domain.to_unit_range`).
    cache_dir: where the array is cached (default
      :func:`picpq_jax.data.image_folder.default_cache_dir`).
    workers: processes (default: the CPU count, at most 8); 1 runs in this process.
      Workers are started with ``spawn`` (this process may hold JAX's threads), so a
      script that calls this with ``workers > 1`` must guard its entry point with
      ``if __name__ == "__main__":``, as ``multiprocessing`` requires.
    progress: show a tqdm bar over samples.

  Returns:
    ``(x, scenarios)``; the frequency-domain ``HF`` for rho is
    :func:`~picpq_jax.csi.domain.frequency_response` of ``x``.
  """
  if num_ues < 1 or samples_per_ue < 1:
    raise UserError(f"need at least one UE and one sample per UE, got {num_ues} UEs and "
                    f"{samples_per_ue} samples per UE")
  if normalize not in NORMALIZATIONS:
    raise UserError(f"unknown CSI normalization {normalize!r}: choose one of "
                    f"{', '.join(NORMALIZATIONS)}")
  from picpq_jax.data.image_folder import default_cache_dir
  scenarios = ue_scenarios(num_ues, seed)
  settings = dict(version=FORMAT_VERSION, quadriga_lib=importlib.metadata.version("quadriga-lib"),
                  num_ues=num_ues, samples_per_ue=samples_per_ue,
                  seed=seed, normalize=normalize, carrier=CARRIER_HZ, bandwidth=BANDWIDTH_HZ,
                  chunk=CHUNK)
  path = cache_path(cache_dir or default_cache_dir(), settings)
  if path.exists():
    return np.load(path), scenarios
  x = _generate(scenarios, samples_per_ue, seed, normalize, workers, progress)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
  np.save(tmp, x)
  os.replace(tmp, path)
  return x, scenarios


def _generate(scenarios, samples_per_ue, seed, normalize, workers, progress) -> np.ndarray:
  """Runs every chunk (in worker processes) and assembles ``[U, n, 32, 32, 2]``."""
  import tqdm
  tasks = [(u, start, s, min(CHUNK, samples_per_ue - start),
            int(np.random.SeedSequence([seed, u, start]).generate_state(1)[0]), normalize)
           for u, s in enumerate(scenarios) for start in range(0, samples_per_ue, CHUNK)]
  x = np.empty((len(scenarios), samples_per_ue, ANTENNAS, ANTENNAS, 2), np.float32)
  workers = workers or min(os.cpu_count() or 1, 8)
  bar = tqdm.tqdm(total=x.shape[0] * x.shape[1], unit="sample", desc="quadriga CSI",
                  disable=not progress)
  with bar:
    if workers == 1:
      results = map(_task, tasks)
      pool = None
    else:
      pool = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"))
      results = pool.map(_task, tasks)
    try:
      for u, start, chunk in results:
        x[u, start:start + len(chunk)] = chunk
        bar.update(len(chunk))
    finally:
      if pool is not None:
        pool.shutdown(cancel_futures=True)
  if normalize == "dataset":
    x = to_unit_range(x[..., 0] + 1j * x[..., 1], "dataset").reshape(x.shape)
  return x
