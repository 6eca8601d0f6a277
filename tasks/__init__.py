"""Data and task sources: supervised image datasets, MAML sinusoids, N-way K-shot tasks.

Tasks know nothing of kernels or models: they hand out numpy arrays in the meta-learning task
convention `{"support": (x, y), "query": (x, y), "info": {...}}`, stacked over a leading
meta-batch axis, reproducible from an int seed or a JAX PRNG key.
"""
from __future__ import annotations

from tasks._common import KeyOrSeed
from tasks._sources import DatasetNotPreparedError
from tasks.datasets import DATASET_NAMES, Dataset, load_dataset, one_hot
from tasks.few_shot import (CLASS_SPLIT_SEED, DIGITS_CLASS_SPLITS,
                            DIGITS_CLASS_SPLITS_WITH_VALIDATION, FEW_SHOT_SOURCE_NAMES,
                            OMNIGLOT_CLASS_SPLITS, OMNIGLOT_SPLIT_SIZES, TFDS_CLASS_SPLIT_SIZES,
                            FewShotSampler, FewShotSource, load_few_shot_source, split_classes)
from tasks.sampler import TaskBatch, TaskSampler
from tasks.sinusoid import SinusoidSampler

__all__ = [
    "CLASS_SPLIT_SEED",
    "DATASET_NAMES",
    "DIGITS_CLASS_SPLITS",
    "DIGITS_CLASS_SPLITS_WITH_VALIDATION",
    "FEW_SHOT_SOURCE_NAMES",
    "OMNIGLOT_CLASS_SPLITS",
    "OMNIGLOT_SPLIT_SIZES",
    "TFDS_CLASS_SPLIT_SIZES",
    "Dataset",
    "DatasetNotPreparedError",
    "FewShotSampler",
    "FewShotSource",
    "KeyOrSeed",
    "SinusoidSampler",
    "TaskBatch",
    "TaskSampler",
    "load_dataset",
    "load_few_shot_source",
    "one_hot",
    "split_classes",
]
