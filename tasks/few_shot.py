"""N-way K-shot classification tasks over class-indexed images.

`FewShotSampler` draws tasks from any in-memory images `x` with class ids `y` (or a mapping
class -> images). `load_few_shot_source` loads a bundled or tfds dataset with a documented split
of its classes into disjoint meta-train / validation / test sets, and `FewShotSource.sampler`
makes a sampler for one of those splits.

Rotations (the Omniglot protocol of Santoro et al. 2016, Vinyals et al. 2016 and MAML): each
class c yields 4 classes, c's images turned by 0, 90, 180 and 270 degrees (`np.rot90(image, k)`,
counter-clockwise, k = 0..3). Splits are made of whole classes with all their rotations, so no
character (or digit) is seen in two splits under different angles.
"""
from __future__ import annotations

import dataclasses
import hashlib
import numbers
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import PIL.Image

from tasks import _sources
from tasks._common import check_positive_int, sample_ordered_subsets
from tasks.sampler import TaskBatch, TaskSampler, TaskSpec

NUM_ROTATIONS = 4
# Seed of the documented class splits below.
CLASS_SPLIT_SEED = 0

# sklearn digits: 6 digits to meta-train on, 4 to meta-test on; with rotations 24 and 16 classes.
DIGITS_CLASS_SPLITS: dict[str, tuple[int, ...]] = {"train": (0, 1, 2, 3, 4, 5),
                                                    "test": (6, 7, 8, 9)}
# The same with a validation split of whole digits (8 classes with rotations). Validation is not
# carved from rotations of training digits: 0, 1 and 8 look alike turned by 180 degrees, so such a
# split would validate on training classes.
DIGITS_CLASS_SPLITS_WITH_VALIDATION: dict[str, tuple[int, ...]] = {
    "train": (0, 1, 2, 3), "validation": (4, 5), "test": (6, 7, 8, 9)}

# Split sizes for the 10- and 100-class tfds datasets, cut by `split_classes` with
# CLASS_SPLIT_SEED. 5 + 5 lets 5-way tasks run on both splits without rotations; 64/16/20 are the
# sizes of CIFAR-FS (Bertinetto et al. 2019), though not its exact class lists.
TFDS_CLASS_SPLIT_SIZES: dict[str, dict[str, int]] = {
    "mnist": {"train": 5, "test": 5},
    "fashion_mnist": {"train": 5, "test": 5},
    "cifar10": {"train": 5, "test": 5},
    "cifar100": {"train": 64, "validation": 16, "test": 20},
}

# Omniglot (1623 characters, 20 drawings each) class splits by name:
#   "vinyals": 1200 meta-train / 423 meta-test characters drawn from all alphabets (Vinyals et al.
#     2016), cut by `split_classes` with CLASS_SPLIT_SEED.
#   "maml": the same 1200 split further into 1100 meta-train and 100 validation (MAML's code).
#   "background_evaluation": Lake et al.'s alphabets, the tfds 'train' split (964 characters of
#     30 alphabets) for meta-train and 'test' (659 characters of 20 alphabets) for meta-test.
OMNIGLOT_CLASS_SPLITS = ("vinyals", "maml", "background_evaluation")
OMNIGLOT_SPLIT_SIZES: dict[str, dict[str, int]] = {
    "vinyals": {"train": 1200, "test": 423},
    "maml": {"train": 1100, "validation": 100, "test": 423},
}
OMNIGLOT_IMAGE_SIZE = 28

FEW_SHOT_SOURCE_NAMES = ((_sources.DIGITS, _sources.TFDS_PREFIX + "omniglot")
                         + tuple(_sources.TFDS_PREFIX + n for n in TFDS_CLASS_SPLIT_SIZES))


class FewShotSampler(TaskSampler):
  """N-way K-shot classification tasks drawn from the classes of in-memory images.

  A task picks `n_way` distinct classes in uniformly random order, label i naming the i-th (so
  each task has a fresh uniformly random label permutation), and `k_shot + k_query` distinct
  images of each class: the first `k_shot` go to the support set, the others to the query set.
  A batch of B tasks is
    {"support": (x, y), "query": (x_q, y_q), "info": {"classes": c, "rotations": r}}
  with
    x: (B, n_way*k_shot, H, W, C) float32, the stored values times `scale`;
    y: (B, n_way*k_shot) int32, grouped by label: k_shot 0s, then k_shot 1s, ...;
    x_q: (B, n_way*k_query, H, W, C) float32 and y_q: (B, n_way*k_query) int32, likewise;
    c: (B, n_way) int32, the class id (as in `y`) behind each label;
    r: (B, n_way) int32, the quarter turns `np.rot90(image, r)` applied to that class's images
      (always 0 without rotations).

  Args:
    x: (M, H, W, C) images of a real dtype (e.g. uint8 with scale=1/255), finite.
    y: (M,) integer class ids.
    n_way: classes per task, at least 2 (a 1-way task is trivially solved) and at most
      `num_classes`.
    k_shot: support images per class, >= 1.
    k_query: query images per class, >= 1; `k_shot + k_query` must not exceed the images of the
      smallest class used.
    classes: the class ids of `y` to draw from (e.g. one split); None for all.
    rotations: make each class 4 classes, its images turned by 0, 90, 180, 270 degrees (needs
      H == W).
    scale: factor applied to the float32 images.
    num_tasks: size of a fixed pool of tasks drawn once from `pool_seed`; None for endless
      sampling.
    pool_seed: seed of the pool (unused when `num_tasks` is None).
  """

  def __init__(self, x: np.ndarray, y: np.ndarray, *, n_way: int, k_shot: int, k_query: int,
               classes: Sequence[int] | np.ndarray | None = None, rotations: bool = False,
               scale: float = 1.0, num_tasks: int | None = None, pool_seed: int = 0) -> None:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 4 or x.dtype.kind not in "uif":
      raise ValueError(f"`x` must be a (M, H, W, C) array of real numbers, got shape {x.shape} "
                       f"and dtype {x.dtype}.")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
      bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
      raise ValueError(f"`x` holds non-finite values (NaN or inf) in {bad.size} of its "
                       f"{len(x)} images, e.g. images {bad[:5].tolist()}: tasks drawn from them "
                       "would carry them into training.")
    if y.shape != x.shape[:1] or y.dtype.kind not in "iu":
      raise ValueError(f"`y` must be ({x.shape[0]},) integer class ids (one per image of `x`), "
                       f"got shape {y.shape} and dtype {y.dtype}.")
    if y.size and (y.min() < np.iinfo(np.int32).min or y.max() > np.iinfo(np.int32).max):
      raise ValueError(f"`y` class ids must fit in int32, got values from {y.min()} to "
                       f"{y.max()}.")
    if rotations and x.shape[1] != x.shape[2]:
      raise ValueError(f"`rotations` needs square images, got H, W = {x.shape[1:3]}.")
    if not (isinstance(scale, numbers.Real) and np.isfinite(scale) and scale > 0):
      raise ValueError(f"`scale` must be a finite positive number, got {scale!r}.")
    self.n_way = check_positive_int("n_way", n_way)
    if self.n_way < 2:
      raise ValueError(f"`n_way` must be at least 2, got {self.n_way}: a 1-way task has a "
                       "single class, so every prediction is trivially right.")
    self.k_shot = check_positive_int("k_shot", k_shot)
    self.k_query = check_positive_int("k_query", k_query)
    self.rotations = bool(rotations)
    self.scale = float(scale)
    self.classes = _check_classes(y, classes)
    self._x, self._y = x, y

    # Images grouped by class: class j's images are x[_members[_starts[j]:_starts[j] + _counts[j]]].
    position = np.searchsorted(self.classes, y)
    in_split = np.flatnonzero(np.isin(y, self.classes))
    self._members = in_split[np.argsort(position[in_split], kind="stable")]
    self._counts = np.bincount(position[in_split], minlength=len(self.classes))
    self._starts = np.cumsum(self._counts) - self._counts

    if self.n_way > self.num_classes:
      rotated = f" ({len(self.classes)} classes x {NUM_ROTATIONS} rotations)" if rotations else ""
      raise ValueError(f"`n_way`={self.n_way} exceeds the {self.num_classes} classes available"
                       f"{rotated}.")
    smallest = int(np.argmin(self._counts))
    if self.k_shot + self.k_query > self._counts[smallest]:
      raise ValueError(
          f"`k_shot` + `k_query` = {self.k_shot} + {self.k_query} exceeds the "
          f"{self._counts[smallest]} images held by class {self.classes[smallest]} (the smallest "
          f"of the {len(self.classes)} classes); at most {self._counts[smallest]} are available.")
    super().__init__(num_tasks=num_tasks, pool_seed=pool_seed)

  @classmethod
  def from_mapping(cls, images_by_class: Mapping[Hashable, Any], **kwargs: Any) -> FewShotSampler:
    """A sampler over a mapping class -> (n_c, H, W, C) images.

    Class ids (in `info["classes"]` and the `classes` argument) are the positions of the keys in
    the mapping's order. Other keyword arguments are those of `FewShotSampler`.
    """
    if not images_by_class:
      raise ValueError("`images_by_class` must hold at least one class, got an empty mapping.")
    arrays = [np.asarray(images) for images in images_by_class.values()]
    shapes = {a.shape[1:] for a in arrays}
    if any(a.ndim != 4 for a in arrays) or len(shapes) != 1:
      raise ValueError("`images_by_class` values must be (n_c, H, W, C) arrays sharing (H, W, C), "
                       f"got shapes {[a.shape for a in arrays]}.")
    y = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])
    return cls(np.concatenate(arrays), y, **kwargs)

  def _settings(self) -> dict[str, Any]:
    # The images enter by a digest of their labels and of a strided sample of their values
    # (at most ~2^20 of them): cheap for CIFAR-100's 180 MB, yet another dataset, split or
    # preprocessing changes it.
    stride = max(1, self._x.size // 2 ** 20)
    digest = hashlib.sha256(np.ascontiguousarray(self._y).tobytes())
    digest.update(np.ascontiguousarray(self._x.reshape(-1)[::stride]).tobytes())
    return {"n_way": self.n_way, "k_shot": self.k_shot, "k_query": self.k_query,
            "rotations": self.rotations, "scale": self.scale,
            "classes": self.classes.tolist(),
            "images": {"shape": list(self._x.shape), "dtype": str(self._x.dtype),
                       "sha256": digest.hexdigest()[:16]}}

  @property
  def num_classes(self) -> int:
    """Number of classes tasks are drawn from (rotated copies included)."""
    return len(self.classes) * self._num_turns

  @property
  def _num_turns(self) -> int:
    return NUM_ROTATIONS if self.rotations else 1

  def _draw(self, rng: np.random.Generator, num: int) -> TaskSpec:
    # Class v is base class v // turns turned by v % turns quarter turns.
    classes = sample_ordered_subsets(rng, np.full(num, self.num_classes), self.n_way)
    base = classes // self._num_turns
    per_class = self.k_shot + self.k_query
    picks = sample_ordered_subsets(rng, self._counts[base].ravel(), per_class)
    images = self._members[self._starts[base][..., None] + picks.reshape(*base.shape, per_class)]
    return {"classes": classes, "images": images}

  def _build(self, spec: TaskSpec) -> TaskBatch:
    classes, picked = spec["classes"], spec["images"]
    num = len(classes)
    # Gathered and turned in the stored dtype, converted last: 4x less memory traffic for uint8.
    images = self._x[picked]
    turns = classes % self._num_turns
    for k in range(1, self._num_turns):
      turned = turns == k
      images[turned] = np.rot90(images[turned], k, axes=(2, 3))

    def task_set(chosen: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
      x = chosen.reshape(num, self.n_way * per_class, *images.shape[3:]).astype(np.float32)
      x *= np.float32(self.scale)
      labels = np.repeat(np.arange(self.n_way, dtype=np.int32), per_class)
      return x, np.tile(labels, (num, 1))

    return {"support": task_set(images[:, :, :self.k_shot], self.k_shot),
            "query": task_set(images[:, :, self.k_shot:], self.k_query),
            "info": {"classes": self.classes[classes // self._num_turns].astype(np.int32),
                     "rotations": turns.astype(np.int32)}}


@dataclasses.dataclass(frozen=True)
class FewShotSource:
  """Class-indexed images with a split of their classes into disjoint sets.

  Attributes:
    x: (M, H, W, C) stored images (uint8 for the bundled sources).
    y: (M,) int64 class ids.
    scale: factor mapping stored values to [0, 1].
    class_splits: split name (e.g. "train", "validation", "test") -> sorted int64 class ids;
      the splits are pairwise disjoint.
    rotations: whether samplers add rotated classes unless told otherwise (True for digits and
      Omniglot, as in MAML; False for MNIST, Fashion-MNIST and CIFAR).
    name: the name it was loaded by.
  """
  x: np.ndarray
  y: np.ndarray
  scale: float
  class_splits: Mapping[str, np.ndarray]
  rotations: bool
  name: str

  def sampler(self, split: str, *, n_way: int, k_shot: int, k_query: int,
              rotations: bool | None = None, num_tasks: int | None = None,
              pool_seed: int = 0) -> FewShotSampler:
    """A `FewShotSampler` over the classes of `split`; `rotations=None` uses the source's."""
    if split not in self.class_splits:
      raise ValueError(f"`split` must be one of {sorted(self.class_splits)} for {self.name!r}, "
                       f"got {split!r}.")
    return FewShotSampler(self.x, self.y, classes=self.class_splits[split], n_way=n_way,
                          k_shot=k_shot, k_query=k_query,
                          rotations=self.rotations if rotations is None else rotations,
                          scale=self.scale, num_tasks=num_tasks, pool_seed=pool_seed)


def load_few_shot_source(
    name: str, *, data_dir: str | None = None,
    class_splits: str | Mapping[str, Sequence[int]] | None = None) -> FewShotSource:
  """Loads images by class with a split of the classes for meta-train / validation / test.

  Args:
    name: one of
      "digits": sklearn's 8x8x1 digits (bundled, offline), all 1797 images; default split
        `DIGITS_CLASS_SPLITS` (digits 0-5 meta-train, 6-9 meta-test), rotations on.
      "tfds:omniglot": both tfds splits, each drawing turned to grayscale, resized to 28x28 with
        a Lanczos filter and inverted (strokes 1, background 0) as in MAML; default split
        "vinyals", rotations on.
      "tfds:mnist", "tfds:fashion_mnist", "tfds:cifar10", "tfds:cifar100": the tfds train and
        test splits pooled (tasks are split by class, not by image); default split sizes
        `TFDS_CLASS_SPLIT_SIZES` cut by `split_classes(..., seed=CLASS_SPLIT_SEED)`, rotations
        off.
    data_dir: tfds data directory (None: tfds's default); must be None for "digits".
    class_splits: None for the source's default; for Omniglot, a name in
      `OMNIGLOT_CLASS_SPLITS`; or an explicit mapping split name -> class ids (e.g. from
      `split_classes`), pairwise disjoint.

  Returns:
    A `FewShotSource`.
  """
  tfds_name = _sources.parse_name(name, set(TFDS_CLASS_SPLIT_SIZES) | {"omniglot"},
                                 data_dir)
  named_rule = (tfds_name == "omniglot" and isinstance(class_splits, str)
                and class_splits in OMNIGLOT_CLASS_SPLITS)
  # Checked before loading, which can take a while.
  if not (class_splits is None or named_rule or isinstance(class_splits, Mapping)):
    allowed = f"one of {OMNIGLOT_CLASS_SPLITS}, " if tfds_name == "omniglot" else ""
    raise ValueError(f"`class_splits` must be {allowed}None or a mapping split -> class ids for "
                     f"{name!r}, got {class_splits!r}.")
  if tfds_name is None:
    x, y = _sources.digits_arrays()
    scale = _sources.DIGITS_SCALE
  else:
    transform = _omniglot_image if tfds_name == "omniglot" else None
    images, labels = zip(*(
        _sources.read_records(source, range(len(source)), transform)
        for source in (_sources.open_tfds(tfds_name, split, data_dir)
                       for split in ("train", "test"))))
    x, y = np.concatenate(images), np.concatenate(labels)
    scale = _sources.UINT8_SCALE

  if isinstance(class_splits, Mapping):
    splits = class_splits
  elif tfds_name is None:
    splits = DIGITS_CLASS_SPLITS
  elif tfds_name != "omniglot":
    splits = split_classes(y, TFDS_CLASS_SPLIT_SIZES[tfds_name], seed=CLASS_SPLIT_SEED)
  elif class_splits == "background_evaluation":
    # Lake et al.'s background / evaluation alphabets are the tfds train / test splits.
    splits = {"train": labels[0], "test": labels[1]}
  else:
    splits = split_classes(y, OMNIGLOT_SPLIT_SIZES[class_splits or "vinyals"],
                           seed=CLASS_SPLIT_SEED)
  return FewShotSource(x=x, y=y, scale=scale, class_splits=_check_class_splits(splits),
                       rotations=tfds_name in (None, "omniglot"), name=name)


def split_classes(classes: int | Sequence[int] | np.ndarray, sizes: Mapping[str, int], *,
                  seed: int = 0) -> dict[str, np.ndarray]:
  """Splits classes into disjoint sets by a seeded rule.

  The rule: permute the (sorted) classes with `np.random.default_rng(seed).permutation`, then cut
  consecutive chunks of `sizes[name]` classes in the order of `sizes`; classes past the last
  chunk are left out. Each chunk is returned sorted.

  Args:
    classes: a number n (classes 0..n-1) or the class ids.
    sizes: split name -> number of classes, each >= 1, summing to at most the number of classes.
    seed: seed of the permutation.

  Returns:
    split name -> sorted int64 class ids.
  """
  ids = np.arange(classes) if isinstance(classes, numbers.Integral) else np.unique(classes)
  counts = {split: check_positive_int(f"sizes[{split!r}]", size) for split, size in sizes.items()}
  if not counts or sum(counts.values()) > len(ids):
    raise ValueError(f"`sizes` must ask for between 1 and {len(ids)} classes (the classes "
                     f"available) in all, got {dict(sizes)}.")
  order = np.random.default_rng(seed).permutation(ids).astype(np.int64)
  ends = np.cumsum(list(counts.values()))
  return {split: np.sort(order[end - count:end])
          for (split, count), end in zip(counts.items(), ends)}


def _omniglot_image(image: np.ndarray) -> np.ndarray:
  """(105, 105, 3) uint8 black-on-white drawing -> (28, 28, 1) uint8, strokes bright (MAML)."""
  gray = PIL.Image.fromarray(image).convert("L")
  small = gray.resize((OMNIGLOT_IMAGE_SIZE, OMNIGLOT_IMAGE_SIZE), PIL.Image.Resampling.LANCZOS)
  return 255 - np.asarray(small)[..., None]


def _check_classes(y: np.ndarray, classes: Sequence[int] | np.ndarray | None) -> np.ndarray:
  """Sorted unique int64 class ids to draw from, each present in `y`."""
  if classes is None:
    if y.size == 0:
      raise ValueError("`y` holds no images, so there are no classes to draw from.")
    return np.unique(y).astype(np.int64)
  ids = np.asarray(classes)
  if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
    raise ValueError(f"`classes` must be a non-empty 1-D sequence of int class ids, got shape "
                     f"{ids.shape} and dtype {ids.dtype}.")
  if len(np.unique(ids)) != len(ids):
    raise ValueError(f"`classes` must not repeat a class id, got {ids.tolist()}.")
  missing = np.setdiff1d(ids, y)
  if missing.size:
    raise ValueError(f"`classes` {missing.tolist()[:10]} have no images in `y` "
                     f"({missing.size} missing of {ids.size}).")
  return np.sort(ids).astype(np.int64)


def _check_class_splits(splits: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
  """Sorted int64 class ids per split; raises unless the splits are non-empty and disjoint."""
  if not isinstance(splits, Mapping) or not splits:
    raise ValueError(f"`class_splits` must be a non-empty mapping split name -> class ids, got "
                     f"{splits!r}.")
  result = {}
  for split, ids in splits.items():
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
      raise ValueError(f"`class_splits[{split!r}]` must be a non-empty 1-D sequence of int class "
                       f"ids, got shape {ids.shape} and dtype {ids.dtype}.")
    for other, other_ids in result.items():
      shared = np.intersect1d(ids, other_ids)
      if shared.size:
        raise ValueError(f"`class_splits` {split!r} and {other!r} share classes "
                         f"{shared.tolist()[:10]}; splits must be disjoint.")
    result[split] = np.unique(ids).astype(np.int64)
  return result
