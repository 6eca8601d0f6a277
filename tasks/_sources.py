"""Raw image sources shared by the supervised datasets and the few-shot tasks.

Images are kept as stored (uint8) with a `scale` that maps them to [0, 1]; converting to float32
happens only for what is handed out, which keeps CIFAR or MNIST in memory at a quarter the size.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import sklearn.datasets
import tensorflow_datasets as tfds

TFDS_PREFIX = "tfds:"
DIGITS = "digits"
# sklearn's digits are 8x8 counts of set pixels in 4x4 blocks, 0..16.
DIGITS_SCALE = 1.0 / 16.0
UINT8_SCALE = 1.0 / 255.0

ImageTransform = Callable[[np.ndarray], np.ndarray]


def parse_name(name: str, allowed_tfds: Iterable[str], data_dir: str | None = None) -> str | None:
  """The tfds dataset name for "tfds:NAME", None for "digits"; raises for anything else, and
  for a `data_dir` given with "digits" (which reads no directory: a user who passes one
  expects their own copy to be read)."""
  allowed = sorted(allowed_tfds)
  if name == DIGITS:
    if data_dir is not None:
      raise ValueError(f"`data_dir` applies to tfds datasets; {DIGITS!r} ships with "
                       f"scikit-learn and reads no directory (got data_dir={data_dir!r}).")
    return None
  if isinstance(name, str) and name.startswith(TFDS_PREFIX) and name[len(TFDS_PREFIX):] in allowed:
    return name[len(TFDS_PREFIX):]
  choices = ", ".join([repr(DIGITS)] + [repr(TFDS_PREFIX + n) for n in allowed])
  raise ValueError(f"`name` must be one of {choices}; got {name!r}.")


class ArraySource(Sequence[dict[str, Any]]):
  """In-memory images and labels read like a tfds data source, one record per index."""

  def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """sklearn's bundled digits: images (1797, 8, 8, 1) uint8 in 0..16, labels (1797,) int64."""
  digits = sklearn.datasets.load_digits()
  return digits.images.astype(np.uint8)[..., None], digits.target.astype(np.int64)


class DatasetNotPreparedError(ValueError):
  """A tfds dataset is not prepared in the data directory, and tfds could not prepare it."""


def _tfds_dir(data_dir: str | None) -> str:
  if data_dir is not None:
    return os.path.expanduser(str(data_dir))
  try:
    return tfds.core.constants.get_default_data_dir()
  except Exception:  # noqa: BLE001 - only used to word an error message
    return "~/tensorflow_datasets"


def is_prepared(name: str, data_dir: str | None) -> bool:
  """Whether `data_dir` (None: tfds's default) holds a prepared version of tfds dataset `name`
  (a `NAME/[CONFIG/]VERSION/dataset_info.json`)."""
  root = os.path.join(_tfds_dir(data_dir), name)
  return bool(glob.glob(os.path.join(glob.escape(root), "*", "dataset_info.json"))
              or glob.glob(os.path.join(glob.escape(root), "*", "*", "dataset_info.json")))


def open_tfds(name: str, split: str, data_dir: str | None) -> Sequence[dict[str, Any]]:
  """Random-access tfds source of one split (records are dicts of numpy values).

  Reading prepared ArrayRecord data needs no TensorFlow. When the data is not in `data_dir`,
  tfds downloads and prepares it, and the builders of these datasets use TensorFlow for that
  (or prepare it elsewhere: `tfds build NAME --file_format=array_record`). If that fails and
  the data is not prepared, raises `DatasetNotPreparedError` (a ValueError) saying how to
  prepare it.
  """
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - reworded only when the data is missing
    if is_prepared(name, data_dir):
      raise
    where = _tfds_dir(data_dir)
    cause = f"{type(e).__name__}: {e}".splitlines()[0]
    raise DatasetNotPreparedError(
        f"tfds dataset {name!r} is not prepared in {where} and tfds could not prepare it "
        f"({cause}); prepare it with `tfds build {name} --data_dir {where} "
        "--file_format=array_record` (needs TensorFlow and network access; or build it "
        "elsewhere and copy the folder), or point data_dir (--data-dir) at a folder that "
        "holds it.") from e


def read_records(source: Sequence[dict[str, Any]], indices: Iterable[int],
                 transform: ImageTransform | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Images and labels of `source[i]` for i in `indices` (record access is one at a time).

  Args:
    source: random-access records with an "image" (H, W, C) uint8 and an int "label".
    indices: which records, in this order.
    transform: applied to each image right after reading, so that large raw images (Omniglot's
      105x105x3) never pile up in memory.

  Returns:
    images (n, H', W', C') uint8 and labels (n,) int64.
  """
  images, labels = [], []
  for i in indices:
    record = source[int(i)]
    image = np.asarray(record["image"])
    images.append(image if transform is None else transform(image))
    labels.append(int(record["label"]))
  return np.stack(images), np.asarray(labels, dtype=np.int64)
