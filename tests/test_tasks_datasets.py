"""Supervised datasets: digits split and scaling, tfds loaders (mocked), subsets, one-hot."""
from __future__ import annotations

import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds

from tasks import DATASET_NAMES, load_dataset, one_hot


def _mock_tfds(num_examples):
  return tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE)


def test_digits_split_is_fixed_and_stratified():
  data = load_dataset("digits", standardize=False)
  assert data.name == "digits" and data.num_classes == 10
  assert data.x_train.shape == (1347, 8, 8, 1) and data.x_test.shape == (450, 8, 8, 1)
  assert data.x_train.dtype == data.x_test.dtype == np.float32
  assert data.y_train.dtype == data.y_test.dtype == np.int32
  assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
  digits = sklearn.datasets.load_digits()
  # Train and test together are the whole of sklearn's digits, once each.
  together = np.concatenate([data.x_train, data.x_test]).reshape(-1, 64) * 16
  np.testing.assert_array_equal(np.sort(together.round().astype(int), axis=0),
                                np.sort(digits.data.astype(int), axis=0))
  assert set(np.unique(data.y_test)) == set(range(10))
  fractions = np.bincount(data.y_test) / np.bincount(digits.target)
  np.testing.assert_allclose(fractions, 0.25, atol=0.01)
  again = load_dataset("digits", standardize=False, seed=5)
  np.testing.assert_array_equal(again.x_test, data.x_test)


def test_standardization_uses_training_statistics():
  raw = load_dataset("digits", standardize=False)
  data = load_dataset("digits")
  np.testing.assert_allclose(data.x_train.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(data.x_train.std(), 1.0, atol=1e-5)
  mean, std = raw.x_train.mean(dtype=np.float64), raw.x_train.std(dtype=np.float64)
  np.testing.assert_allclose(data.x_test, (raw.x_test - mean) / std, rtol=1e-5, atol=1e-5)


def test_subsets_and_flatten():
  data = load_dataset("digits", n_train=100, n_test=30, seed=1, flatten=True)
  assert data.x_train.shape == (100, 64) and data.x_test.shape == (30, 64)
  assert data.y_train.shape == (100,) and data.y_test.shape == (30,)
  same = load_dataset("digits", n_train=100, n_test=30, seed=1, flatten=True)
  np.testing.assert_array_equal(same.x_train, data.x_train)
  np.testing.assert_array_equal(same.y_test, data.y_test)
  other = load_dataset("digits", n_train=100, n_test=30, seed=2, flatten=True)
  assert not np.array_equal(other.x_train, data.x_train)
  more_train = load_dataset("digits", n_train=200, n_test=30, seed=1, standardize=False)
  fewer_train = load_dataset("digits", n_train=10, n_test=30, seed=1, standardize=False)
  np.testing.assert_array_equal(more_train.x_test, fewer_train.x_test)
  full = load_dataset("digits", standardize=False)
  subset = load_dataset("digits", n_train=50, seed=3, standardize=False)
  rows = {row.tobytes() for row in full.x_train}
  assert all(row.tobytes() in rows for row in subset.x_train)


@pytest.mark.parametrize("name, shape, num_classes", [
    ("mnist", (28, 28, 1), 10),
    ("fashion_mnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10),
    ("cifar100", (32, 32, 3), 100),
])
def test_tfds_datasets(name, shape, num_classes):
  with _mock_tfds(40):
    full = load_dataset(f"tfds:{name}", data_dir="/tmp/no-tfds-data-here", standardize=False)
    data = load_dataset(f"tfds:{name}", n_train=12, n_test=5, seed=0)
    again = load_dataset(f"tfds:{name}", n_train=12, n_test=5, seed=0)
    flat = load_dataset(f"tfds:{name}", n_train=3, n_test=2, flatten=True)
    with pytest.raises(ValueError, match=r"`n_train` must be an int in \[1, 40\]"):
      load_dataset(f"tfds:{name}", n_train=41)
  assert full.name == f"tfds:{name}" and full.num_classes == num_classes
  assert full.x_train.shape == (40,) + shape and full.x_test.shape == (40,) + shape
  assert 0.0 <= full.x_train.min() and full.x_train.max() <= 1.0
  assert data.x_train.shape == (12,) + shape and data.x_test.shape == (5,) + shape
  assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
  assert np.all((data.y_train >= 0) & (data.y_train < num_classes))
  np.testing.assert_allclose(data.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(data.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
  np.testing.assert_array_equal(again.x_train, data.x_train)
  assert flat.x_train.shape == (3, int(np.prod(shape)))


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "mnist"}, r"`name` must be one of 'digits', 'tfds:cifar10'"),
    ({"name": "tfds:svhn_cropped"}, "`name` must be one of"),
    ({"name": "digits", "n_train": 0}, r"`n_train` must be an int in \[1, 1347\]"),
    ({"name": "digits", "n_train": 1348}, r"`n_train` must be an int in \[1, 1347\]"),
    ({"name": "digits", "n_test": 451}, r"`n_test` must be an int in \[1, 450\]"),
    ({"name": "digits", "n_test": 2.0}, "`n_test`"),
    ({"name": "digits", "seed": -1}, "`seed`"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    load_dataset(**kwargs)


def test_dataset_names_are_loadable_names():
  assert DATASET_NAMES == ("digits", "tfds:mnist", "tfds:fashion_mnist", "tfds:cifar10",
                           "tfds:cifar100")


def test_one_hot():
  targets = one_hot(np.array([[0, 2], [1, 2]], np.int32), 3)
  assert targets.shape == (2, 2, 3) and targets.dtype == np.float32
  np.testing.assert_array_equal(targets[0], [[1, 0, 0], [0, 0, 1]])
  np.testing.assert_array_equal(targets.sum(-1), 1.0)
  assert one_hot(np.array([1]), 2, dtype=np.int32).dtype == np.int32
  with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\)"):
    one_hot(np.array([0, 3]), 3)
  with pytest.raises(ValueError, match="`labels` must hold integers"):
    one_hot(np.array([0.0, 1.0]), 3)
  with pytest.raises(ValueError, match="`num_classes`"):
    one_hot(np.array([0]), 0)


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path, monkeypatch):
  import tasks
  from tasks import _sources

  def cannot_prepare(name, split, data_dir):
    raise ModuleNotFoundError("No module named 'importlib_resources'")

  monkeypatch.setattr(_sources.tfds, "data_source", cannot_prepare)
  empty = tmp_path / "empty"
  with pytest.raises(tasks.DatasetNotPreparedError,
                     match=rf"'mnist' is not prepared in {empty} .*ModuleNotFoundError.*"
                           rf"tfds build mnist --data_dir {empty}"):
    load_dataset("tfds:mnist", data_dir=str(empty), n_train=4)
  # A prepared dataset that fails to open keeps its own error.
  (tmp_path / "ready" / "mnist" / "3.0.1").mkdir(parents=True)
  (tmp_path / "ready" / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")
  assert _sources.is_prepared("mnist", str(tmp_path / "ready"))
  with pytest.raises(ModuleNotFoundError):
    load_dataset("tfds:mnist", data_dir=str(tmp_path / "ready"), n_train=4)


def test_digits_refuses_a_data_dir():
  """digits reads no directory: a data_dir given with it would be silently ignored."""
  with pytest.raises(ValueError, match=r"`data_dir` applies to tfds datasets; 'digits' ships "
                                       r"with scikit-learn .*data_dir='/data/tfds'"):
    load_dataset("digits", data_dir="/data/tfds", n_train=4)
