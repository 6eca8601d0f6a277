"""Small supervised image datasets for training-curve experiments.

Images are scaled to [0, 1] and then, by default, standardized per channel with the mean and
standard deviation of the training images actually returned (over examples and pixels). Per
channel rather than per feature: border pixels of digits and MNIST are constant, so per-feature
statistics would divide by zero, and a per-channel affine map keeps the spatial structure that
convolutional kernels see.
"""
from __future__ import annotations

import dataclasses
import numbers

import numpy as np
import sklearn.model_selection

from tasks import _sources
from tasks._common import as_generator, check_positive_int

# tfds datasets `load_dataset` reads, with their number of classes.
TFDS_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
DATASET_NAMES = (_sources.DIGITS,) + tuple(_sources.TFDS_PREFIX + n for n in TFDS_NUM_CLASSES)
# Fixed, stratified split of sklearn's 1797 digits: 1347 train, 450 test.
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A supervised image dataset held in memory.

  Attributes:
    x_train: (n_train, H, W, C) float32, or (n_train, H*W*C) when loaded with `flatten=True`.
    y_train: (n_train,) int32 labels in [0, num_classes).
    x_test: (n_test, H, W, C) or (n_test, H*W*C) float32, transformed with the training
      statistics.
    y_test: (n_test,) int32 labels in [0, num_classes).
    num_classes: number of classes of the full dataset (a subset may miss some).
    name: the name it was loaded by, e.g. "digits" or "tfds:mnist".
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str


def load_dataset(name: str, *, data_dir: str | None = None, n_train: int | None = None,
                 n_test: int | None = None, seed: int = 0, flatten: bool = False,
                 standardize: bool = True) -> Dataset:
  """Loads a dataset, or a seeded random subset of it (the empirical NTK costs O(N²)).

  Args:
    name: "digits" (sklearn's 8x8x1 digits, bundled, works offline; a fixed stratified split of
      1347 train / 450 test images), or "tfds:mnist", "tfds:fashion_mnist" (28x28x1),
      "tfds:cifar10", "tfds:cifar100" (32x32x3) read with `tfds.data_source` (their own
      train/test splits).
    data_dir: tfds data directory (None: tfds's default); must be None for "digits".
    n_train: number of training examples, a uniformly random subset without replacement; None
      for all.
    n_test: the same for the test split.
    seed: seed of the subsets (the same seed gives the same subsets; the test subset does not
      depend on `n_train`); the digits train/test split does not depend on it.
    flatten: return images as (N, H*W*C) vectors instead of (N, H, W, C).
    standardize: standardize per channel with training statistics; False keeps [0, 1].

  Returns:
    A `Dataset` of float32 images and int32 labels, in the source's order.
  """
  tfds_name = _sources.parse_name(name, TFDS_NUM_CLASSES, data_dir)
  if tfds_name is None:
    images, labels = _sources.digits_arrays()
    split_indices = sklearn.model_selection.train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels,
        random_state=DIGITS_SPLIT_SEED)
    sources = {split: _sources.ArraySource(images[np.sort(idx)], labels[np.sort(idx)])
               for split, idx in zip(("train", "test"), split_indices)}
    scale, num_classes = _sources.DIGITS_SCALE, 10
  else:
    sources = {split: _sources.open_tfds(tfds_name, split, data_dir)
               for split in ("train", "test")}
    scale, num_classes = _sources.UINT8_SCALE, TFDS_NUM_CLASSES[tfds_name]
  # One stream per split, so that the test subset does not change with `n_train`.
  rngs = as_generator(seed, "seed").spawn(2)
  split_arrays = {
      split: _sources.read_records(
          sources[split], _subset(rng, len(sources[split]), count, f"n_{split}"))
      for rng, (split, count) in zip(rngs, (("train", n_train), ("test", n_test)))}

  x_train = split_arrays["train"][0].astype(np.float32) * np.float32(scale)
  x_test = split_arrays["test"][0].astype(np.float32) * np.float32(scale)
  if standardize:
    mean = x_train.mean(axis=(0, 1, 2), dtype=np.float64)
    std = x_train.std(axis=(0, 1, 2), dtype=np.float64)
    # A constant channel (possible in a tiny subset) is only centered.
    std = np.where(std > 0, std, 1.0)
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
  if flatten:
    x_train = x_train.reshape(len(x_train), -1)
    x_test = x_test.reshape(len(x_test), -1)
  return Dataset(x_train=x_train, y_train=split_arrays["train"][1].astype(np.int32),
                 x_test=x_test, y_test=split_arrays["test"][1].astype(np.int32),
                 num_classes=num_classes, name=name)


def one_hot(labels: np.ndarray, num_classes: int, dtype: np.dtype = np.float32) -> np.ndarray:
  """One-hot targets: (...,) int labels in [0, num_classes) -> (..., num_classes) of `dtype`."""
  labels = np.asarray(labels)
  num_classes = check_positive_int("num_classes", num_classes)
  if labels.dtype.kind not in "iu":
    raise ValueError(f"`labels` must hold integers, got dtype {labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"`labels` must lie in [0, {num_classes}) for num_classes={num_classes}, got "
                     f"values from {labels.min()} to {labels.max()}.")
  return (labels[..., None] == np.arange(num_classes)).astype(dtype)


def _subset(rng: np.random.Generator, available: int, count: int | None,
            name: str) -> np.ndarray:
  """Sorted indices of a uniformly random `count`-subset of range(available) (all if None)."""
  if count is None:
    return np.arange(available)
  if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not (
      1 <= count <= available):
    raise ValueError(f"`{name}` must be an int in [1, {available}] (the examples available), "
                     f"got {count!r}.")
  return np.sort(rng.choice(available, size=int(count), replace=False))
