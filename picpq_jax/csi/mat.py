"""Loader for CsiNet's COST2100 ``.mat`` files, as users of CsiNet have them.

Files and keys (Wen et al. 2018's release):

* ``DATA_H{train,val,test}{in,out}.mat``: key ``HT``, float ``[N, 2048]`` in [0, 1]
  (100k / 30k / 20k samples). CsiNet's reference reshapes a row to
  ``[2, 32, 32]`` (C order: real part then imaginary part, rows = angle, columns =
  delay); :func:`load_ht` returns the same values as NHWC ``[N, 32, 32, 2]``
  float32, i.e. ``HT.reshape(N, 2, 32, 32).transpose(0, 2, 3, 1)``.
* ``DATA_HtestF{in,out}_all.mat``: key ``HF_all``, complex ``[N, 32 * 125]``, the
  frequency-domain test channels for rho; :func:`load_hf` returns ``[N, 32, 125]``
  complex64 (``HF_all.reshape(N, 32, 125)``, as the reference does).

:func:`load_cost2100` loads one scenario's files from a folder by those names.

MATLAB v5 files are read with ``scipy.io.loadmat``; v7.3 files (HDF5) with h5py
when it is installed. HDF5 stores a MATLAB array transposed (column-major), so a
v7.3 ``HT`` reads as ``[2048, N]`` and is transposed back; complex values come as
a compound of ``real`` and ``imag`` fields.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from picpq_jax.csi.domain import ANTENNAS, CODE_SIZE, DELAY_ROWS, RHO_CARRIERS
from picpq_jax.errors import UserError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _read_hdf5(path: Path, key: str) -> np.ndarray:
  """``key`` of a v7.3 file as the MATLAB array (transposed back to row-major)."""
  try:
    import h5py
  except ImportError:
    raise UserError(f"{path} is a MATLAB v7.3 (HDF5) file and h5py is not installed: "
                    "pip install h5py, or re-save it with save(..., '-v7')") from None
  with h5py.File(path, "r") as f:
    if key not in f:
      raise UserError(f"{path} has no {key!r} array (it has {sorted(f.keys())}); "
                      f"give a CsiNet file that holds {key!r}")
    data = f[key][()]
  if data.dtype.names and {"real", "imag"} <= set(data.dtype.names):
    data = data["real"] + 1j * data["imag"]
  return np.asarray(data).T


def read_mat(path: str | os.PathLike, key: str) -> np.ndarray:
  """The array ``key`` of a MATLAB file (v5 via scipy, v7.3 via h5py).

  Raises:
    UserError: the file is missing, unreadable, or has no ``key``.
  """
  path = Path(path)
  if not path.is_file():
    raise UserError(f"CSI file not found: {path}; give the path of a CsiNet .mat file")
  with open(path, "rb") as f:
    head = f.read(520)
  if HDF5_MAGIC in (head[:8], head[512:520]):
    return _read_hdf5(path, key)
  import scipy.io
  try:
    contents = scipy.io.loadmat(path, variable_names=[key])
  except Exception as e:  # scipy raises several types for a corrupt file
    raise UserError(f"cannot read {path} as a MATLAB file ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); give a CsiNet .mat file") from None
  if key not in contents:
    raise UserError(f"{path} has no {key!r} array; give a CsiNet file that holds {key!r} "
                    f"(DATA_H*.mat hold 'HT', DATA_HtestF*_all.mat hold 'HF_all')")
  return contents[key]


def load_ht(path: str | os.PathLike, key: str = "HT") -> np.ndarray:
  """``DATA_H*.mat`` -> float32 NHWC ``[N, 32, 32, 2]`` in [0, 1] (0.5 = zero).

  Raises:
    UserError: missing file or key, a row that is not 2048 values, or values
      outside [0, 1] (the file is not in CsiNet's scaling).
  """
  ht = read_mat(path, key)
  if ht.ndim != 2 or ht.shape[1] != CODE_SIZE or np.iscomplexobj(ht):
    raise UserError(f"{path}: {key!r} must be real [N, {CODE_SIZE}] "
                    f"(2 x {ANTENNAS} x {DELAY_ROWS} per row), got {ht.dtype} {list(ht.shape)}")
  ht = ht.astype(np.float32)
  if ht.size and (ht.min() < 0.0 or ht.max() > 1.0):
    raise UserError(f"{path}: {key!r} values span [{ht.min():.3g}, {ht.max():.3g}], not [0, 1]; "
                    "CsiNet data is scaled into [0, 1] with 0.5 = zero")
  return ht.reshape(-1, 2, ANTENNAS, DELAY_ROWS).transpose(0, 2, 3, 1).copy()


def load_hf(path: str | os.PathLike, key: str = "HF_all") -> np.ndarray:
  """``DATA_HtestF*_all.mat`` -> complex64 ``[N, 32, 125]`` (antenna, subcarrier).

  Raises:
    UserError: missing file or key, or a row that is not 32 x 125 values.
  """
  hf = read_mat(path, key)
  size = ANTENNAS * RHO_CARRIERS
  if hf.ndim != 2 or hf.shape[1] != size:
    raise UserError(f"{path}: {key!r} must be [N, {size}] ({ANTENNAS} x {RHO_CARRIERS} "
                    f"per row), got {list(hf.shape)}")
  return hf.reshape(-1, ANTENNAS, RHO_CARRIERS).astype(np.complex64)


COST2100_SCENARIOS = ("in", "out")  # indoor 5.3 GHz picocell, outdoor 300 MHz rural


def cost2100_paths(folder: str | os.PathLike, scenario: str = "in") -> dict[str, Path]:
  """CsiNet's file names for ``scenario``: ``train``, ``val``, ``test`` (``HT``) and
  ``test_freq`` (``HF_all``) -> ``<folder>/DATA_H{split}{scenario}.mat`` and
  ``<folder>/DATA_HtestF{scenario}_all.mat``."""
  if scenario not in COST2100_SCENARIOS:
    raise UserError(f"unknown COST2100 scenario {scenario!r}: choose 'in' (indoor) or "
                    "'out' (outdoor)")
  folder = Path(folder)
  paths = {split: folder / f"DATA_H{split}{scenario}.mat" for split in ("train", "val", "test")}
  paths["test_freq"] = folder / f"DATA_HtestF{scenario}_all.mat"
  return paths


def load_cost2100(folder: str | os.PathLike, scenario: str = "in") -> dict[str, np.ndarray]:
  """One scenario of CsiNet's COST2100 release from ``folder``.

  Returns:
    ``{"train", "val", "test"}``: float32 ``[N, 32, 32, 2]`` (:func:`load_ht`) and
    ``"test_freq"``: complex64 ``[N_test, 32, 125]`` (:func:`load_hf`).

  Raises:
    UserError: any file missing or malformed, or a test set whose frequency file
      holds a different number of samples.
  """
  paths = cost2100_paths(folder, scenario)
  data = {split: load_ht(paths[split]) for split in ("train", "val", "test")}
  data["test_freq"] = load_hf(paths["test_freq"])
  if len(data["test_freq"]) != len(data["test"]):
    raise UserError(f"{paths['test_freq']} holds {len(data['test_freq'])} samples but "
                    f"{paths['test']} {len(data['test'])}; give files of the same test set")
  return data
