"""Image folders, in a directory or a zip file, decoded once and cached as .npy.

Layout (the usual image-folder layout, one folder per class)::

  <root>/<split>/<class>/<file>      a directory
  <split>/<class>/<file>             members of a .zip

Classes are sorted by name and numbered 0, 1, ...; files are sorted by name
within a class, so the order of the examples never depends on the file system
or on the order of the zip's members. Hidden files (``.name``), ``__MACOSX``
folders, files that are not images (judged by their extension), files directly
under ``<split>/`` and anything nested deeper than ``<class>/<file>`` are
ignored.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image
import tqdm

from picpq_jax.data.dataset import ImageDataset
from picpq_jax.errors import UserError

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif",
                    ".tiff", ".webp")
_CACHE_FORMAT = 1  # Bump when the layout of a cache entry changes.
_CHUNK = 512  # Images decoded per thread-pool task.
_THREADS_FROM_PIXELS = 96 * 96  # Decode on several threads from this size.


def default_cache_dir() -> Path:
  """``$PICPQ_CACHE`` if set, otherwise ``~/.cache/picpq_jax``."""
  env = os.environ.get("PICPQ_CACHE")
  return Path(env).expanduser() if env else Path.home() / ".cache/picpq_jax"


def load_image_folder(path: str | os.PathLike,
                      split: str = "train",
                      cache_dir: str | os.PathLike | None = None
                     ) -> ImageDataset:
  """Loads ``<split>/<class>/<file>`` images from a directory or a .zip.

  The first call decodes every image with Pillow (to RGB) and stores the
  arrays under ``cache_dir`` (default :func:`default_cache_dir`), keyed by the
  source's absolute path, size and modification time (for a directory: of
  every file of the split) and the split; later calls load the cached arrays,
  identical bit for bit. A cache entry is written to a temporary folder and
  renamed into place, so an interrupted run never leaves a corrupt one. When
  the cache cannot be written, a warning is issued and the data returned
  anyway.

  Args:
    path: a directory holding ``<split>/`` or a .zip holding ``<split>/...``.
    split: the top-level folder to read, e.g. ``"train"``.
    cache_dir: where decoded arrays are kept.

  Returns:
    ImageDataset: images uint8 [N, H, W, 3], labels int32 [N], class names
    sorted.

  Raises:
    UserError: a missing path, a file that is not a (readable) zip, an absent
      split, an image that does not decode, or images of different sizes.
  """
  path = Path(path).expanduser().resolve()
  if not path.exists():
    raise UserError(f"image folder {path} does not exist; pass a directory or "
                    "a .zip laid out as <split>/<class>/<file>")
  cache_root = (Path(cache_dir).expanduser() if cache_dir is not None
                else default_cache_dir())
  if path.is_dir():
    class_names, members = _index_members(_directory_names(path, split), split,
                                          path)
    entry = _cache_entry(cache_root, path, split,
                         _directory_fingerprint(path, members))
    cached = _read_entry(entry)
    if cached is not None:
      return cached
    images = _decode_all(members, _directory_reader(path), path)
  else:
    stat = path.stat()
    entry = _cache_entry(cache_root, path, split,
                         [stat.st_size, stat.st_mtime_ns])
    cached = _read_entry(entry)  # A hit never opens the zip.
    if cached is not None:
      return cached
    with _open_zip(path) as zf:
      class_names, members = _index_members(zf.namelist(), split, path)
      images = _decode_all(members, _zip_reader(zf, path), path)
  labels = np.array([label for _, label in members], np.int32)
  dataset = ImageDataset(images, labels, class_names)
  _write_entry(entry, dataset, source=f"{path} [{split}]")
  return dataset


def _open_zip(path: Path) -> zipfile.ZipFile:
  """Opens ``path`` as a zip, or raises a UserError saying why it cannot."""
  if not zipfile.is_zipfile(path):
    raise UserError(f"{path} is neither a directory nor a zip file; pass a "
                    "directory or a .zip laid out as <split>/<class>/<file>")
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise UserError(f"{path} is a corrupt zip file ({e}); re-download or "
                    "re-create it") from None


def _directory_names(root: Path, split: str) -> list[str]:
  """Relative posix names ``split/class/file`` under ``root``, plus a
  ``name/`` entry per folder, as a zip lists them (so absent splits and empty
  class folders are seen)."""
  names = [f"{p.name}/" for p in root.iterdir() if p.is_dir()]
  split_dir = root / split
  if split_dir.is_dir():
    for class_dir in split_dir.iterdir():
      if class_dir.is_dir():
        names.append(f"{split}/{class_dir.name}/")
        names += [f"{split}/{class_dir.name}/{f.name}"
                  for f in class_dir.iterdir() if f.is_file()]
  return names


def _is_image_name(name: str) -> bool:
  return (not name.startswith(".")
          and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)


def _index_members(names: Iterable[str], split: str, source: Path
                  ) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
  """Sorted class names and ``(member name, label)`` pairs of one split.

  Args:
    names: posix paths relative to the root (zip member names).
    split: the top-level folder to keep.
    source: the directory or zip, for error messages.
  """
  splits, by_class = set(), {}
  for name in names:
    parts = name.split("/")
    if len(parts) > 1 and parts[0] and not parts[0].startswith((".",
                                                                "__MACOSX")):
      splits.add(parts[0])
    if len(parts) == 3 and parts[0] == split and not parts[1].startswith("."):
      files = by_class.setdefault(parts[1], [])
      if _is_image_name(parts[2]):
        files.append(name)
  if split not in splits:
    found = ", ".join(sorted(splits)) or "none"
    raise UserError(f"split {split!r} not found in {source} (splits found: "
                    f"{found}); pass one of those or lay files out as "
                    f"{split}/<class>/<file>")
  if not by_class:
    raise UserError(f"{source}/{split} holds no class folders; lay files out "
                    f"as {split}/<class>/<file>")
  class_names = tuple(sorted(by_class))
  for name in class_names:
    if not by_class[name]:
      raise UserError(f"class folder {source}/{split}/{name} holds no images "
                      f"(extensions: {' '.join(IMAGE_EXTENSIONS)}); add "
                      "images or remove the folder")
  members = [(member, label) for label, name in enumerate(class_names)
             for member in sorted(by_class[name])]
  return class_names, members


def _directory_fingerprint(root: Path, members: list[tuple[str, int]]
                          ) -> str:
  """A digest of the name, size and mtime of every image of the split."""
  digest = hashlib.sha256()
  for member, _ in members:
    stat = (root / member).stat()
    digest.update(f"{member}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def _directory_reader(root: Path) -> Callable[[str], bytes]:
  def read(member: str) -> bytes:
    try:
      return (root / member).read_bytes()
    except OSError as e:
      raise UserError(f"cannot read {root / member} ({e}); check that the "
                      "file exists and is readable") from None
  return read


def _zip_reader(zf: zipfile.ZipFile, path: Path) -> Callable[[str], bytes]:
  lock = threading.Lock()  # One ZipFile is not safe to read from threads.

  def read(member: str) -> bytes:
    try:
      with lock:
        return zf.read(member)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
      raise UserError(f"{path} is a corrupt zip file: cannot read {member} "
                      f"({e}); re-download or re-create it") from None
  return read


def _decode(data: bytes, name: str) -> np.ndarray:
  """Decodes one image file's bytes to uint8 [H, W, 3] RGB."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode != "RGB":
        image = image.convert("RGB")
      return np.asarray(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise UserError(f"cannot decode image {name} ({e}); delete or replace "
                    "the file") from None


def _decode_all(members: list[tuple[str, int]], read: Callable[[str], bytes],
                source: Path) -> np.ndarray:
  """Decodes every member, in order, into uint8 [N, H, W, 3].

  All images must share the first image's size; threads decode chunks of
  ``_CHUNK`` images into one preallocated array.
  """
  first = _decode(read(members[0][0]), f"{source}/{members[0][0]}")
  images = np.empty((len(members),) + first.shape, np.uint8)

  def decode_chunk(start: int) -> None:
    for i in range(start, min(start + _CHUNK, len(members))):
      name = f"{source}/{members[i][0]}"
      image = _decode(read(members[i][0]), name)
      if image.shape != first.shape:
        raise UserError(
            f"image {name} is {image.shape[1]}x{image.shape[0]} but "
            f"{source}/{members[0][0]} is {first.shape[1]}x{first.shape[0]}; "
            "all images of a split must share one size (resize them)")
      images[i] = image

  # Small images are decoded in Python-bound time, where threads only fight
  # over the GIL (measured: 50k 32x32 JPEGs take 7 s on one thread, 9 s on
  # two); Pillow releases the GIL while decoding larger ones.
  small = first.shape[0] * first.shape[1] < _THREADS_FROM_PIXELS
  workers = 1 if small else min(8, os.cpu_count() or 1)
  with (concurrent.futures.ThreadPoolExecutor(workers) as pool,
        tqdm.tqdm(total=len(members), desc=f"decoding {source.name}",
                  unit="img", disable=None, leave=False) as progress):
    futures = [pool.submit(decode_chunk, start)
               for start in range(0, len(members), _CHUNK)]
    try:
      for future in futures:  # In order: the first bad file is reported.
        future.result()
        progress.update(min(_CHUNK, len(members) - progress.n))
    finally:
      for future in futures:
        future.cancel()
  return images


def _cache_entry(cache_root: Path, path: Path, split: str, fingerprint
                ) -> Path:
  """The cache folder of one split of one source version."""
  text = json.dumps([_CACHE_FORMAT, str(path), split, fingerprint])
  key = hashlib.sha256(text.encode()).hexdigest()[:32]
  return cache_root / f"image_folder-{key}"


def _read_entry(entry: Path) -> ImageDataset | None:
  """The dataset stored in cache folder ``entry``; None when there is none
  or it is damaged (it is then rebuilt)."""
  if not entry.is_dir():
    return None
  try:
    meta = json.loads((entry / "meta.json").read_text())
    images = np.load(entry / "images.npy", allow_pickle=False)
    labels = np.load(entry / "labels.npy", allow_pickle=False)
    return ImageDataset(images, labels, tuple(meta["class_names"]))
  except (OSError, ValueError, KeyError, TypeError) as e:
    warnings.warn(f"ignoring damaged cache entry {entry} ({e}); rebuilding "
                  "it", stacklevel=3)
    return None


def _write_entry(entry: Path, dataset: ImageDataset, source: str) -> None:
  """Writes ``dataset`` to cache folder ``entry`` atomically (a temporary
  folder renamed into place); warns instead of failing."""
  tmp = None
  try:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    np.save(tmp / "images.npy", dataset.images, allow_pickle=False)
    np.save(tmp / "labels.npy", dataset.labels, allow_pickle=False)
    meta = {"source": source, "class_names": list(dataset.class_names)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if entry.exists():  # A stale entry, or another process won the race.
      shutil.rmtree(entry, ignore_errors=True)
    try:
      os.replace(tmp, entry)
      tmp = None
    except OSError:
      if not (entry / "meta.json").exists():  # Else another process won.
        raise
  except OSError as e:
    warnings.warn(f"could not write cache entry {entry} ({e}); the data will "
                  "be decoded again next time (set PICPQ_CACHE to a writable "
                  "folder)", stacklevel=3)
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
