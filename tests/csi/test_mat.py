"""The COST2100 .mat loader on small files written in CsiNet's format."""

import numpy as np
import pytest
import scipy.io

from picpq_jax.csi import mat
from picpq_jax.errors import UserError


def write_v73(path, name, value):
  """A MATLAB v7.3 file: HDF5 with a 512-byte header, arrays stored transposed,
  complex values as a (real, imag) compound."""
  h5py = pytest.importorskip("h5py")
  value = np.asarray(value)
  if np.iscomplexobj(value):
    compound = np.dtype([("real", "<f8"), ("imag", "<f8")])
    stored = np.empty(value.T.shape, compound)
    stored["real"], stored["imag"] = value.T.real, value.T.imag
  else:
    stored = value.T
  with h5py.File(path, "w", userblock_size=512) as f:
    f[name] = stored
  with open(path, "r+b") as f:
    f.write(b"MATLAB 7.3 MAT-file, written by a test".ljust(128))


@pytest.fixture
def ht():
  rng = np.random.default_rng(1)
  return rng.uniform(0, 1, (3, 2048))


def expected_nhwc(ht):
  """CsiNet's reshape(N, 2, 32, 32) then channels-last, written out index by index."""
  out = np.empty((len(ht), 32, 32, 2), np.float32)
  for n in range(len(ht)):
    for c in range(2):
      for a in range(32):
        for d in range(32):
          out[n, a, d, c] = ht[n, c * 1024 + a * 32 + d]
  return out


def test_loads_ht_from_a_v5_file(tmp_path, ht):
  scipy.io.savemat(tmp_path / "DATA_Htestin.mat", {"HT": ht})
  x = mat.load_ht(tmp_path / "DATA_Htestin.mat")
  assert x.dtype == np.float32 and x.shape == (3, 32, 32, 2)
  np.testing.assert_array_equal(x, expected_nhwc(ht))


def test_loads_ht_and_hf_from_v73_files(tmp_path, ht):
  write_v73(tmp_path / "h.mat", "HT", ht)
  np.testing.assert_array_equal(mat.load_ht(tmp_path / "h.mat"), expected_nhwc(ht))
  hf = np.arange(2 * 4000).reshape(2, 4000) * (1 + 2j)
  write_v73(tmp_path / "f.mat", "HF_all", hf)
  got = mat.load_hf(tmp_path / "f.mat")
  assert got.shape == (2, 32, 125) and got.dtype == np.complex64
  assert got[1, 2, 3] == hf[1, 2 * 125 + 3]


def test_loads_hf_from_a_v5_file(tmp_path):
  hf = (np.arange(4000) * (1 - 1j)).reshape(1, 4000)
  scipy.io.savemat(tmp_path / "DATA_HtestFin_all.mat", {"HF_all": hf})
  got = mat.load_hf(tmp_path / "DATA_HtestFin_all.mat")
  assert got.shape == (1, 32, 125) and got[0, 31, 124] == hf[0, 3999]


@pytest.mark.parametrize("contents, message", [
    ({"H": np.zeros((2, 2048))}, "has no 'HT' array"),
    ({"HT": np.zeros((2, 1024))}, "must be real [N, 2048]"),
    ({"HT": np.full((2, 2048), 3.0)}, "not [0, 1]"),
])
def test_bad_files_are_one_line_user_errors(tmp_path, contents, message):
  scipy.io.savemat(tmp_path / "bad.mat", contents)
  with pytest.raises(UserError, match=None) as e:
    mat.load_ht(tmp_path / "bad.mat")
  assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_and_unreadable_files_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="not found"):
    mat.load_ht(tmp_path / "nope.mat")
  (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
  with pytest.raises(UserError, match="cannot read"):
    mat.load_ht(tmp_path / "junk.mat")
  scipy.io.savemat(tmp_path / "f.mat", {"HF_all": np.zeros((1, 100), complex)})
  with pytest.raises(UserError, match=r"must be \[N, 4000\]"):
    mat.load_hf(tmp_path / "f.mat")


def test_v73_without_the_key_is_a_user_error(tmp_path, ht):
  write_v73(tmp_path / "h.mat", "X", ht)
  with pytest.raises(UserError, match="has no 'HT' array"):
    mat.load_ht(tmp_path / "h.mat")


def test_loads_a_cost2100_folder_by_csinet_file_names(tmp_path, ht):
  for split in ("train", "val", "test"):
    scipy.io.savemat(tmp_path / f"DATA_H{split}out.mat", {"HT": ht})
  scipy.io.savemat(tmp_path / "DATA_HtestFout_all.mat", {"HF_all": np.ones((3, 4000), complex)})
  data = mat.load_cost2100(tmp_path, "out")
  assert data["train"].shape == (3, 32, 32, 2) and data["test_freq"].shape == (3, 32, 125)
  scipy.io.savemat(tmp_path / "DATA_HtestFout_all.mat", {"HF_all": np.ones((2, 4000), complex)})
  with pytest.raises(UserError, match="same test set"):
    mat.load_cost2100(tmp_path, "out")
  with pytest.raises(UserError, match="DATA_Htrainin.mat"):
    mat.load_cost2100(tmp_path, "in")
  with pytest.raises(UserError, match="unknown COST2100 scenario"):
    mat.load_cost2100(tmp_path, "indoor")
