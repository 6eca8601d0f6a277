"""N-way K-shot tasks: shapes, labels, class splits, rotations, uniformity, pools, errors."""
from __future__ import annotations

import collections
import itertools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import scipy.stats
import tensorflow_datasets as tfds

from tasks import (DIGITS_CLASS_SPLITS, DIGITS_CLASS_SPLITS_WITH_VALIDATION, OMNIGLOT_SPLIT_SIZES,
                   TFDS_CLASS_SPLIT_SIZES, FewShotSampler, load_few_shot_source, split_classes)

# Chi-square tests run on fixed seeds, so they are deterministic; the threshold only guards
# against a biased sampler.
P_MIN = 1e-3
CLASS_SIZES = {10: 5, 11: 6, 12: 7, 13: 8, 14: 9, 15: 5}


@pytest.fixture(scope="module")
def images():
  """Distinct random 6x6x2 uint8 images (no rotation of one equals another), with class ids."""
  y = np.repeat(list(CLASS_SIZES), list(CLASS_SIZES.values()))
  x = np.random.default_rng(0).integers(0, 256, size=(len(y), 6, 6, 2), dtype=np.uint8)
  return x, y


def _lookup(x, y):
  """bytes of an image -> [(class, index)] of its copies, to find sampled images in the source."""
  copies = collections.defaultdict(list)
  for i, (image, label) in enumerate(zip(x, y)):
    copies[image.tobytes()].append((int(label), i))
  return copies


def _assert_batches_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _check_batch(batch, x, y, scale, n_way, k_shot, k_query):
  """Checks shapes, labels and that every image is its class's original, turned as reported."""
  originals = _lookup((x * np.float32(scale)).astype(np.float32), y)
  classes, turns = batch["info"]["classes"], batch["info"]["rotations"]
  num = len(classes)
  assert classes.shape == turns.shape == (num, n_way)
  assert classes.dtype == turns.dtype == np.int32
  for (xs, ys), per in ((batch["support"], k_shot), (batch["query"], k_query)):
    assert xs.shape == (num, n_way * per) + x.shape[1:] and xs.dtype == np.float32
    assert ys.shape == (num, n_way * per) and ys.dtype == np.int32
    np.testing.assert_array_equal(ys, np.tile(np.repeat(np.arange(n_way), per), (num, 1)))
  for t in range(num):
    assert len(set(zip(classes[t], turns[t]))) == n_way
    used = set()
    for xs, ys in (batch["support"], batch["query"]):
      for image, label in zip(xs[t], ys[t]):
        original = np.rot90(image, -turns[t, label], axes=(0, 1))
        copies = [(c, i) for c, i in originals[np.ascontiguousarray(original).tobytes()]
                  if c == classes[t, label]]
        assert copies
        # Support and query images of a class are distinct (checkable for unique images).
        if len(copies) == 1:
          assert (label, copies[0]) not in used
          used.add((label, copies[0]))


def test_shapes_labels_and_images(images):
  x, y = images
  sampler = FewShotSampler(x, y, n_way=3, k_shot=2, k_query=3, scale=1 / 255)
  assert sampler.num_classes == 6
  batch = sampler.sample(0, 20)
  _check_batch(batch, x, y, 1 / 255, 3, 2, 3)
  assert np.all(batch["info"]["rotations"] == 0)
  assert 0.0 <= batch["support"][0].min() and batch["support"][0].max() <= 1.0


def test_rotations_make_four_classes_of_rotated_images(images):
  x, y = images
  sampler = FewShotSampler(x, y, n_way=5, k_shot=1, k_query=1, rotations=True)
  assert sampler.num_classes == 4 * len(CLASS_SIZES)
  batch = sampler.sample(1, 200)
  _check_batch(batch, x, y, 1.0, 5, 1, 1)  # rotated images equal np.rot90 of the originals
  seen = set(zip(batch["info"]["classes"].ravel(), batch["info"]["rotations"].ravel()))
  assert seen == set(itertools.product(CLASS_SIZES, range(4)))


def test_rotations_need_square_images():
  with pytest.raises(ValueError, match="square"):
    FewShotSampler(np.zeros((4, 3, 5, 1)), np.arange(4) % 2, n_way=2, k_shot=1, k_query=1,
                   rotations=True)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6), data=st.data())
def test_any_valid_sizes_give_valid_tasks(sizes, data):
  y = np.repeat(np.arange(len(sizes)), sizes)
  x = np.arange(len(y) * 9, dtype=np.int32).reshape(len(y), 3, 3, 1)
  # One class makes only 1-way tasks, refused, unless rotations turn it into 4.
  rotations = data.draw(st.booleans()) if len(sizes) > 1 else True
  n_way = data.draw(st.integers(2, len(sizes) * (4 if rotations else 1)))
  k_shot = data.draw(st.integers(1, max(1, min(sizes) - 1)))
  k_query = data.draw(st.integers(1, max(1, min(sizes) - k_shot)))
  arguments = {"n_way": n_way, "k_shot": k_shot, "k_query": k_query, "rotations": rotations}
  if k_shot + k_query > min(sizes):
    with pytest.raises(ValueError, match=f"at most {min(sizes)} are available"):
      FewShotSampler(x, y, **arguments)
    return
  batch = FewShotSampler(x, y, **arguments).sample(data.draw(st.integers(0, 2**32)), 3)
  _check_batch(batch, x, y, 1.0, n_way, k_shot, k_query)


def test_label_permutations_are_uniform():
  x = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(6, 2, 2, 1)
  y = np.repeat([0, 1, 2], 2)
  batch = FewShotSampler(x, y, n_way=3, k_shot=1, k_query=1).sample(0, 6000)
  counts = collections.Counter(map(tuple, batch["info"]["classes"]))
  assert set(counts) == set(itertools.permutations(range(3)))
  assert scipy.stats.chisquare(list(counts.values())).pvalue > P_MIN


def test_ordered_class_choices_are_uniform(images):
  x, y = images
  batch = FewShotSampler(x, y, n_way=2, k_shot=1, k_query=1).sample(3, 6000)
  counts = collections.Counter(map(tuple, batch["info"]["classes"]))
  assert set(counts) == set(itertools.permutations(CLASS_SIZES, 2))
  assert scipy.stats.chisquare(list(counts.values())).pvalue > P_MIN


def test_support_query_image_choices_are_uniform():
  # Two classes of 5 images; label 0's support and query image are 2 distinct images of one.
  x = np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2, 1)
  y = np.repeat([0, 1], 5)
  batch = FewShotSampler(x, y, n_way=2, k_shot=1, k_query=1).sample(4, 8000)
  pairs = zip(batch["support"][0][:, 0, 0, 0, 0], batch["query"][0][:, 0, 0, 0, 0])
  counts = collections.Counter(pairs)
  assert len(counts) == 2 * 5 * 4  # ordered pairs of distinct images of the same class
  assert scipy.stats.chisquare(list(counts.values())).pvalue > P_MIN


def test_same_seed_same_tasks_different_seed_different_tasks(images):
  x, y = images
  sampler = FewShotSampler(x, y, n_way=3, k_shot=1, k_query=2, rotations=True)
  _assert_batches_equal(sampler.sample(5, 8), sampler.sample(5, 8))
  other = FewShotSampler(x, y, n_way=3, k_shot=1, k_query=2, rotations=True)
  _assert_batches_equal(sampler.sample(5, 8), other.sample(5, 8))
  assert not np.array_equal(sampler.sample(5, 8)["support"][0], sampler.sample(6, 8)["support"][0])
  key = jax.random.key(1)
  _assert_batches_equal(sampler.sample(key, 8), sampler.sample(key, 8))
  assert not np.array_equal(sampler.sample(key, 8)["support"][0],
                            sampler.sample(jax.random.fold_in(key, 1), 8)["support"][0])


def test_fixed_pool_only_yields_pool_tasks(images):
  x, y = images
  sampler = FewShotSampler(x, y, n_way=2, k_shot=2, k_query=1, rotations=True, num_tasks=6,
                           pool_seed=3)
  assert sampler.num_tasks == 6
  pool = sampler.pool_batch(range(6))
  pool_tasks = [jax.tree.map(lambda a, i=i: a[i], pool) for i in range(6)]
  seen = set()
  for seed in range(4):
    batch = sampler.sample(seed, 25)
    for t in range(25):
      task = jax.tree.map(lambda a, t=t: a[t], batch)
      matches = [i for i, p in enumerate(pool_tasks)
                 if all(np.array_equal(u, v)
                        for u, v in zip(jax.tree.leaves(task), jax.tree.leaves(p)))]
      assert len(matches) == 1
      seen.add(matches[0])
  assert seen == set(range(6))
  _assert_batches_equal(pool, FewShotSampler(x, y, n_way=2, k_shot=2, k_query=1, rotations=True,
                                             num_tasks=6, pool_seed=3).pool_batch(range(6)))


def test_classes_restrict_sampling(images):
  x, y = images
  sampler = FewShotSampler(x, y, classes=[11, 13, 14], n_way=2, k_shot=1, k_query=1)
  assert sampler.num_classes == 3
  assert set(np.unique(sampler.sample(0, 100)["info"]["classes"])) == {11, 13, 14}


def test_describe_names_every_setting_that_decides_the_tasks(images):
  """`describe` goes into meta-learning checkpoints: equal for equal settings and images,
  different whenever the tasks would differ (other sizes, classes, rotations, pool or data)."""
  import json
  x, y = images
  kw = dict(n_way=2, k_shot=1, k_query=2, classes=[11, 13, 14], num_tasks=5, pool_seed=3)
  base = FewShotSampler(x, y, **kw).describe()
  assert json.loads(json.dumps(base)) == base
  assert {k: v for k, v in base.items() if k != "images"} == {
      "type": "FewShotSampler", "num_tasks": 5, "pool_seed": 3, "n_way": 2, "k_shot": 1,
      "k_query": 2, "rotations": False, "scale": 1.0, "classes": [11, 13, 14]}
  assert base["images"]["shape"] == list(x.shape) and base["images"]["dtype"] == "uint8"
  assert FewShotSampler(x.copy(), y.copy(), **kw).describe() == base
  brighter = x.copy()
  brighter[0] += 1
  for other in ({"n_way": 3}, {"k_shot": 2}, {"k_query": 1}, {"classes": [11, 13, 15]},
                {"rotations": True}, {"scale": 0.5}, {"num_tasks": 6}, {"pool_seed": 4}):
    assert FewShotSampler(x, y, **(kw | other)).describe() != base, other
  assert FewShotSampler(brighter, y, **kw).describe() != base
  assert FewShotSampler(x, np.where(y == 10, 12, y), **kw).describe() != base


def test_from_mapping(images):
  x, y = images
  mapping = {f"char_{c}": x[y == c] for c in CLASS_SIZES}
  sampler = FewShotSampler.from_mapping(mapping, n_way=6, k_shot=2, k_query=2)
  batch = sampler.sample(0, 10)
  _check_batch(batch, x, np.searchsorted(list(CLASS_SIZES), y), 1.0, 6, 2, 2)
  with pytest.raises(ValueError, match="images_by_class"):
    FewShotSampler.from_mapping({}, n_way=2, k_shot=1, k_query=1)
  with pytest.raises(ValueError, match="images_by_class"):
    FewShotSampler.from_mapping({0: x[:3], 1: x[:3, :5]}, n_way=2, k_shot=1, k_query=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_way": 7}, r"`n_way`=7 exceeds the 6 classes"),
    ({"n_way": 25, "rotations": True}, r"`n_way`=25 exceeds the 24 classes"),
    ({"n_way": 3, "classes": [10, 11]}, r"`n_way`=3 exceeds the 2 classes"),
    ({"k_shot": 3, "k_query": 3}, r"exceeds the 5 images held by class 10.*at most 5"),
    ({"k_shot": 4, "k_query": 4, "classes": [12, 13]}, r"exceeds the 7 images held by class 12"),
    ({"n_way": 0}, "n_way"),
    ({"n_way": 1}, r"`n_way` must be at least 2, got 1"),
    ({"k_shot": 0}, "k_shot"),
    ({"k_query": -1}, "k_query"),
    ({"num_tasks": 0}, "num_tasks"),
    ({"scale": 0.0}, "scale"),
    ({"classes": [10, 99]}, r"`classes` \[99\] have no images"),
    ({"classes": [10, 10]}, "must not repeat"),
    ({"classes": []}, "classes"),
])
def test_bad_arguments_raise(images, kwargs, match):
  x, y = images
  arguments = {"n_way": 2, "k_shot": 1, "k_query": 1, **kwargs}
  with pytest.raises(ValueError, match=match):
    FewShotSampler(x, y, **arguments)


def test_bad_arrays_raise(images):
  x, y = images
  with pytest.raises(ValueError, match="`x` must be a"):
    FewShotSampler(x[..., 0], y, n_way=2, k_shot=1, k_query=1)
  with pytest.raises(ValueError, match="`y` must be"):
    FewShotSampler(x, y[:-1], n_way=2, k_shot=1, k_query=1)
  with pytest.raises(ValueError, match="`y` must be"):
    FewShotSampler(x, y.astype(float), n_way=2, k_shot=1, k_query=1)
  with pytest.raises(ValueError, match="meta_batch_size"):
    FewShotSampler(x, y, n_way=2, k_shot=1, k_query=1).sample(0, 0)


def test_split_classes_is_a_seeded_disjoint_cut():
  splits = split_classes(10, {"train": 5, "validation": 2, "test": 3}, seed=0)
  assert [len(v) for v in splits.values()] == [5, 2, 3]
  assert np.array_equal(np.sort(np.concatenate(list(splits.values()))), np.arange(10))
  order = np.random.default_rng(0).permutation(10)
  np.testing.assert_array_equal(splits["validation"], np.sort(order[5:7]))
  again = split_classes(np.arange(10), {"train": 5, "validation": 2, "test": 3}, seed=0)
  _assert_batches_equal(splits, again)
  assert not np.array_equal(splits["train"], split_classes(10, {"train": 5}, seed=1)["train"])
  with pytest.raises(ValueError, match="between 1 and 10"):
    split_classes(10, {"train": 8, "test": 3})
  with pytest.raises(ValueError, match=r"sizes\['test'\]"):
    split_classes(10, {"train": 8, "test": 0})


def test_digits_source_default_split():
  source = load_few_shot_source("digits")
  assert source.x.shape == (1797, 8, 8, 1) and source.scale == 1 / 16 and source.rotations
  assert {k: tuple(v) for k, v in source.class_splits.items()} == DIGITS_CLASS_SPLITS
  train = source.sampler("train", n_way=5, k_shot=1, k_query=15)
  test = source.sampler("test", n_way=5, k_shot=5, k_query=5, num_tasks=50)
  assert train.num_classes == 24 and test.num_classes == 16
  train_batch, test_batch = train.sample(0, 16), test.sample(0, 16)
  _check_batch(train_batch, source.x, source.y, source.scale, 5, 1, 15)
  _check_batch(test_batch, source.x, source.y, source.scale, 5, 5, 5)
  assert set(np.unique(train_batch["info"]["classes"])) <= set(DIGITS_CLASS_SPLITS["train"])
  assert set(np.unique(test_batch["info"]["classes"])) <= set(DIGITS_CLASS_SPLITS["test"])
  assert train_batch["support"][0].min() >= 0 and train_batch["support"][0].max() <= 1
  no_rotations = source.sampler("test", n_way=4, k_shot=1, k_query=1, rotations=False)
  assert no_rotations.num_classes == 4
  with pytest.raises(ValueError, match=r"`n_way`=5 exceeds the 4 classes"):
    source.sampler("test", n_way=5, k_shot=1, k_query=1, rotations=False)
  with pytest.raises(ValueError, match=r"`split` must be one of \['test', 'train'\]"):
    source.sampler("validation", n_way=2, k_shot=1, k_query=1)
  with pytest.raises(ValueError, match=r"`n_way` must be at least 2, got 1"):
    source.sampler("train", n_way=1, k_shot=1, k_query=1)  # a 1-way task is always right


def test_digits_source_with_validation_and_bad_splits():
  source = load_few_shot_source("digits", class_splits=DIGITS_CLASS_SPLITS_WITH_VALIDATION)
  assert source.sampler("validation", n_way=8, k_shot=1, k_query=1).num_classes == 8
  with pytest.raises(ValueError, match="share classes"):
    load_few_shot_source("digits", class_splits={"train": [0, 1], "test": [1, 2]})
  with pytest.raises(ValueError, match="class_splits"):
    load_few_shot_source("digits", class_splits="vinyals")
  with pytest.raises(ValueError, match="class_splits"):
    load_few_shot_source("digits", class_splits={"train": []})
  with pytest.raises(ValueError, match="`name` must be one of"):
    load_few_shot_source("tfds:imagenet2012")


def _mock_tfds(num_examples, **kwargs):
  return tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE, **kwargs)


@pytest.mark.parametrize("name, shape, num_examples", [
    ("mnist", (28, 28, 1), 120),
    ("fashion_mnist", (28, 28, 1), 120),
    ("cifar10", (32, 32, 3), 120),
    ("cifar100", (32, 32, 3), 1000),
])
def test_tfds_sources(name, shape, num_examples):
  with _mock_tfds(num_examples):
    source = load_few_shot_source(f"tfds:{name}", data_dir="/tmp/no-tfds-data-here")
  # The mock serves the same records for the train and test splits; both are pooled.
  assert source.x.shape == (2 * num_examples,) + shape and source.x.dtype == np.uint8
  assert source.scale == 1 / 255 and not source.rotations
  sizes = TFDS_CLASS_SPLIT_SIZES[name]
  assert {k: len(v) for k, v in source.class_splits.items()} == sizes
  assert np.unique(np.concatenate(list(source.class_splits.values()))).size == sum(sizes.values())
  for split in sizes:
    sampler = source.sampler(split, n_way=3, k_shot=1, k_query=1)
    batch = sampler.sample(0, 4)
    _check_batch(batch, source.x, source.y, source.scale, 3, 1, 1)
    assert set(np.unique(batch["info"]["classes"])) <= set(source.class_splits[split])


class _FakeOmniglot:
  """Records like tfds omniglot's: black-on-white 105x105x3 drawings, 2 per character.

  Characters 0..963 are in the 'train' (background) split and 964..1622 in 'test'
  (evaluation). Drawing i is a black square whose corner depends on i.
  """

  def __init__(self, split):
    self.labels = np.repeat(np.arange(964) if split == "train" else np.arange(964, 1623), 2)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    image = np.full((105, 105, 3), 255, np.uint8)
    corner = 4 * (i % 16)
    image[corner:corner + 40, corner:corner + 40] = 0
    label = self.labels[i]
    return {"image": image, "label": label, "alphabet": label // 40, "alphabet_char_id": label}


@pytest.fixture(scope="module")
def omniglot_sources():
  fake = lambda builder, split, **unused: _FakeOmniglot(split)
  with _mock_tfds(1, as_data_source_fn=fake):
    return {rule: load_few_shot_source("tfds:omniglot", class_splits=rule)
            for rule in (None, "vinyals", "maml", "background_evaluation")}


def test_omniglot_images_are_resized_and_inverted(omniglot_sources):
  source = omniglot_sources[None]
  assert source.x.shape == (2 * 1623, 28, 28, 1) and source.x.dtype == np.uint8
  assert source.rotations and source.scale == 1 / 255
  first = source.x[0, :, :, 0]  # black square over rows and columns 0..39 of 105
  assert first[:9, :9].min() > 240 and first[13:, 13:].max() < 10


def test_omniglot_class_splits(omniglot_sources):
  vinyals = omniglot_sources["vinyals"].class_splits
  assert {k: len(v) for k, v in vinyals.items()} == OMNIGLOT_SPLIT_SIZES["vinyals"]
  _assert_batches_equal(vinyals, omniglot_sources[None].class_splits)
  maml = omniglot_sources["maml"].class_splits
  assert {k: len(v) for k, v in maml.items()} == OMNIGLOT_SPLIT_SIZES["maml"]
  np.testing.assert_array_equal(np.union1d(maml["train"], maml["validation"]), vinyals["train"])
  np.testing.assert_array_equal(maml["test"], vinyals["test"])
  lake = omniglot_sources["background_evaluation"].class_splits
  np.testing.assert_array_equal(lake["train"], np.arange(964))
  np.testing.assert_array_equal(lake["test"], np.arange(964, 1623))
  for splits in (vinyals, maml, lake):
    ids = np.concatenate(list(splits.values()))
    assert len(np.unique(ids)) == len(ids)


def test_omniglot_sampler(omniglot_sources):
  source = omniglot_sources[None]
  sampler = source.sampler("train", n_way=20, k_shot=1, k_query=1, num_tasks=100)
  assert sampler.num_classes == 4 * 1200
  batch = sampler.sample(0, 8)
  _check_batch(batch, source.x, source.y, source.scale, 20, 1, 1)
  assert set(np.unique(batch["info"]["classes"])) <= set(source.class_splits["train"])
  with pytest.raises(ValueError, match=r"exceeds the 2 images held by class"):
    source.sampler("test", n_way=5, k_shot=1, k_query=2)


def test_omniglot_bad_split_rule():
  with pytest.raises(ValueError, match="one of .'vinyals'"):
    load_few_shot_source("tfds:omniglot", class_splits="lake")


def test_non_finite_images_are_refused(images):
  """A NaN image would reach every task that draws it, and training only stops later with a
  non-finite loss."""
  x, y = images
  x = x.astype(np.float32)
  x[7, 2, 3, 1] = np.nan
  x[9, 0, 0, 0] = np.inf
  with pytest.raises(ValueError, match=r"`x` holds non-finite values .* in 2 of its 40 "
                                       r"images, e.g. images \[7, 9\]"):
    FewShotSampler(x, y, n_way=2, k_shot=1, k_query=1)


def test_digits_source_refuses_a_data_dir():
  with pytest.raises(ValueError, match=r"`data_dir` applies to tfds datasets; 'digits'"):
    load_few_shot_source("digits", data_dir="/data/tfds")
