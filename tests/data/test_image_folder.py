"""Tests for load_image_folder on small synthetic folders and zips."""

import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from picpq_jax.data import image_folder
from picpq_jax.data import load_image_folder
from picpq_jax.errors import UserError


def _assert_expected(ds, expected):
  assert ds.class_names == ("ant", "bee", "cat")
  np.testing.assert_array_equal(ds.images, expected["images"])
  np.testing.assert_array_equal(ds.labels, expected["labels"])
  assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32


def test_directory_loads_sorted_and_exact(folder, tmp_path):
  root, expected = folder
  _assert_expected(load_image_folder(root, cache_dir=tmp_path / "c"),
                   expected)


def test_zip_loads_sorted_and_exact(zipped, tmp_path):
  path, expected = zipped
  _assert_expected(load_image_folder(path, cache_dir=tmp_path / "c"), expected)


def test_second_call_reads_cache_bit_for_bit(zipped, tmp_path, monkeypatch):
  path, expected = zipped
  first = load_image_folder(path, cache_dir=tmp_path / "c")
  entries = list((tmp_path / "c").iterdir())
  assert len(entries) == 1 and entries[0].name.startswith("image_folder-")
  assert sorted(p.name for p in entries[0].iterdir()) == [
      "images.npy", "labels.npy", "meta.json"]

  def no_decoding(*args):
    raise AssertionError("decoded again despite a cache entry")

  monkeypatch.setattr(image_folder, "_decode_all", no_decoding)
  second = load_image_folder(path, cache_dir=tmp_path / "c")
  np.testing.assert_array_equal(second.images, first.images)
  np.testing.assert_array_equal(second.labels, first.labels)
  assert second.class_names == first.class_names
  _assert_expected(second, expected)


def test_default_cache_dir_follows_env(folder, tmp_path, monkeypatch):
  root, _ = folder
  monkeypatch.setenv("PICPQ_CACHE", str(tmp_path / "env_cache"))
  assert image_folder.default_cache_dir() == tmp_path / "env_cache"
  load_image_folder(root)
  assert len(list((tmp_path / "env_cache").iterdir())) == 1


def test_changed_source_is_decoded_again(zipped, tmp_path):
  path, _ = zipped
  load_image_folder(path, cache_dir=tmp_path / "c")
  stat = path.stat()
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  load_image_folder(path, cache_dir=tmp_path / "c")
  assert len(list((tmp_path / "c").iterdir())) == 2


def test_changed_file_in_directory_is_decoded_again(folder, tmp_path):
  root, expected = folder
  load_image_folder(root, cache_dir=tmp_path / "c")
  new = np.full((4, 5, 3), 9, np.uint8)
  Image.fromarray(new).save(root / "train/ant/000.png")
  ds = load_image_folder(root, cache_dir=tmp_path / "c")
  np.testing.assert_array_equal(ds.images[0], new)
  np.testing.assert_array_equal(ds.images[1:], expected["images"][1:])


def test_interrupted_cache_write_leaves_no_entry(zipped, tmp_path,
                                                 monkeypatch):
  path, expected = zipped
  cache = tmp_path / "c"
  real_save = np.save
  calls = []

  def failing_save(file, arr, **kwargs):
    calls.append(file)
    if len(calls) == 2:  # Images written, labels not: a crash mid-write.
      raise KeyboardInterrupt
    real_save(file, arr, **kwargs)

  monkeypatch.setattr(np, "save", failing_save)
  with pytest.raises(KeyboardInterrupt):
    load_image_folder(path, cache_dir=cache)
  assert list(cache.iterdir()) == []  # No entry, no temporary folder.
  monkeypatch.setattr(np, "save", real_save)
  _assert_expected(load_image_folder(path, cache_dir=cache), expected)
  _assert_expected(load_image_folder(path, cache_dir=cache), expected)


def test_damaged_cache_entry_is_rebuilt(zipped, tmp_path):
  path, expected = zipped
  load_image_folder(path, cache_dir=tmp_path / "c")
  (entry,) = (tmp_path / "c").iterdir()
  (entry / "images.npy").write_bytes(b"garbage")
  with pytest.warns(UserWarning, match="damaged cache entry"):
    ds = load_image_folder(path, cache_dir=tmp_path / "c")
  _assert_expected(ds, expected)
  _assert_expected(load_image_folder(path, cache_dir=tmp_path / "c"),
                   expected)


def test_unwritable_cache_warns_and_still_loads(folder, tmp_path):
  root, expected = folder
  blocker = tmp_path / "not_a_dir"
  blocker.write_text("a file where the cache folder should be")
  with pytest.warns(UserWarning, match="could not write cache"):
    ds = load_image_folder(root, cache_dir=blocker / "cache")
  _assert_expected(ds, expected)


def test_modes_are_converted_to_rgb(tmp_path):
  for i, mode in enumerate(("L", "RGBA", "P")):
    folder = tmp_path / "f/train/x"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (3, 2), color=7).save(folder / f"{i}.png")
  ds = load_image_folder(tmp_path / "f", cache_dir=tmp_path / "c")
  assert ds.images.shape == (3, 2, 3, 3)


def test_ignores_hidden_and_non_image_files(folder, tmp_path):
  root, expected = folder
  (root / "train/ant/.DS_Store").write_bytes(b"junk")
  (root / "train/ant/notes.txt").write_text("not an image")
  (root / "train/README.md").write_text("top-level file")
  (root / "train/.hidden").mkdir()
  _assert_expected(load_image_folder(root, cache_dir=tmp_path / "c"),
                   expected)


def test_other_split(make_folder, tmp_path):
  root = tmp_path / "f"
  make_folder(root, split="train", classes=("a",))
  expected = make_folder(root, split="val", classes=("b", "c"), per_class=2)
  ds = load_image_folder(root, split="val", cache_dir=tmp_path / "c")
  assert ds.class_names == ("b", "c")
  np.testing.assert_array_equal(ds.images, expected["images"])


# Error paths.


def test_missing_path(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    load_image_folder(tmp_path / "nope.zip", cache_dir=tmp_path / "c")


def test_not_a_zip(tmp_path):
  path = tmp_path / "data.zip"
  path.write_text("this is not a zip archive")
  with pytest.raises(UserError, match="neither a directory nor a zip"):
    load_image_folder(path, cache_dir=tmp_path / "c")


def test_truncated_zip(zipped, tmp_path):
  path, _ = zipped
  data = path.read_bytes()
  broken = tmp_path / "broken.zip"
  broken.write_bytes(data[:len(data) // 2])
  with pytest.raises(UserError, match="zip"):
    load_image_folder(broken, cache_dir=tmp_path / "c")


def test_zip_with_bad_crc(zipped, tmp_path):
  path, _ = zipped
  data = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo("train/bee/001.png")
  offset = info.header_offset + 30 + len(info.filename) + len(info.extra)
  data[offset + 40] ^= 0xFF  # Flip bytes inside the stored PNG.
  broken = tmp_path / "badcrc.zip"
  broken.write_bytes(bytes(data))
  with pytest.raises(UserError, match=r"corrupt zip.*train/bee/001\.png"):
    load_image_folder(broken, cache_dir=tmp_path / "c")


def test_missing_split_lists_existing(folder, zipped, tmp_path):
  root, _ = folder
  (root / "test").mkdir()
  with pytest.raises(UserError, match=r"'val' not found.*test, train"):
    load_image_folder(root, split="val", cache_dir=tmp_path / "c")
  path, _ = zipped
  with pytest.raises(UserError, match=r"'val' not found.*found: train\)"):
    load_image_folder(path, split="val", cache_dir=tmp_path / "c")


def test_corrupt_image_is_named(folder, make_zip, tmp_path):
  root, _ = folder
  (root / "train/bee/001.png").write_bytes(b"\x89PNG but not really")
  with pytest.raises(UserError, match=r"cannot decode image .*bee/001\.png"):
    load_image_folder(root, cache_dir=tmp_path / "c")
  path = make_zip(root, tmp_path / "bad.zip")
  with pytest.raises(UserError, match=r"cannot decode image .*bee/001\.png"):
    load_image_folder(path, cache_dir=tmp_path / "c")
  assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_odd_size_is_named(folder, tmp_path):
  root, _ = folder
  Image.new("RGB", (6, 4)).save(root / "train/cat/002.png")
  with pytest.raises(UserError, match=r"cat/002\.png is 6x4 but .* is 5x4"):
    load_image_folder(root, cache_dir=tmp_path / "c")


def test_empty_class_folder(folder, tmp_path):
  root, _ = folder
  (root / "train/dog").mkdir()
  with pytest.raises(UserError, match="dog holds no images"):
    load_image_folder(root, cache_dir=tmp_path / "c")


def test_split_without_class_folders(tmp_path):
  (tmp_path / "f/train").mkdir(parents=True)
  (tmp_path / "f/train/a.png").write_bytes(b"")
  with pytest.raises(UserError, match="no class folders"):
    load_image_folder(tmp_path / "f", cache_dir=tmp_path / "c")


def test_large_images_decode_on_threads_in_order(tmp_path, monkeypatch):
  root = tmp_path / "big"
  for label, cls in enumerate(("a", "b")):
    (root / "train" / cls).mkdir(parents=True)
    for i in range(3):
      value = np.full((100, 120, 3), 10 * (3 * label + i), np.uint8)
      Image.fromarray(value).save(root / "train" / cls / f"{i}.png")
  monkeypatch.setattr(image_folder, "_CHUNK", 1)  # Six thread-pool tasks.
  ds = load_image_folder(root, cache_dir=tmp_path / "c")
  assert ds.images.shape == (6, 100, 120, 3)
  np.testing.assert_array_equal(ds.images[:, 50, 60, 0], np.arange(6) * 10)
  Image.new("RGB", (3, 3)).save(root / "train/b/1.png")
  Image.new("RGB", (4, 4)).save(root / "train/b/2.png")
  with pytest.raises(UserError, match=r"b/1\.png is 3x3"):  # The first one.
    load_image_folder(root, cache_dir=tmp_path / "c")
