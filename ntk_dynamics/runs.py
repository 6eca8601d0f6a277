"""Run folders that survive crashes: atomic writes, checkpoints and resume.

Every file is written to a temporary sibling and moved into place with `os.replace`, so a
reader (or a resumed run) never sees a half-written file, whatever interrupts the writer.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pathlib
import tempfile
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

PyTree = Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` atomically (temporary file in the same folder, then rename)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  try:
    # mkstemp creates 0600 files; give the result the permissions of an ordinary new file.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "wb") as fh:
      fh.write(data)
      fh.flush()
      os.fsync(fh.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  return path


def _jsonable(obj):
  if isinstance(obj, (np.ndarray, jax.Array)):
    return np.asarray(obj).tolist()
  if isinstance(obj, (np.floating, np.integer, np.bool_)):
    return obj.item()
  if isinstance(obj, pathlib.Path):
    return str(obj)
  raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
  """Writes `obj` as indented JSON (arrays become lists; NaN is written as NaN)."""
  text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)
  return atomic_write_bytes(path, (text + "\n").encode())


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str],
                     rows: Iterable[Sequence[Any]]) -> pathlib.Path:
  """Writes a CSV file with a header row."""
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(header)
  for row in rows:
    writer.writerow([_jsonable(v) if isinstance(v, (np.generic,)) else v for v in row])
  return atomic_write_bytes(path, buf.getvalue().encode())


def save_checkpoint(path: str | os.PathLike, tree: PyTree, *, step: int,
                    extra: Optional[Mapping[str, Any]] = None) -> pathlib.Path:
  """Saves the leaves of `tree` (params, optimizer state, PRNG keys) and the step, atomically.

  Restoring needs a template with the same structure (`load_checkpoint`), which keeps the
  file format plain `.npz` and independent of JAX's internal pytree classes.
  """
  leaves = jax.tree.leaves(tree)
  arrays = {f"leaf_{i:05d}": np.asarray(jax.random.key_data(x)
                                        if _is_typed_key(x) else x)
            for i, x in enumerate(leaves)}
  meta = {"step": int(step), "num_leaves": len(leaves), "extra": dict(extra or {})}
  arrays["__meta__"] = np.frombuffer(json.dumps(meta, default=_jsonable).encode(), np.uint8)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return atomic_write_bytes(path, buf.getvalue())


def _is_typed_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def load_checkpoint(path: str | os.PathLike, template: PyTree
                    ) -> Optional[tuple[int, PyTree, dict]]:
  """Returns `(step, tree, extra)` from `save_checkpoint`, or None if `path` does not exist.

  `template` fixes the pytree structure and leaf dtypes; a mismatch raises ValueError.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return None
  with np.load(path) as data:
    meta = json.loads(bytes(data["__meta__"]).decode())
    t_leaves, treedef = jax.tree.flatten(template)
    if meta["num_leaves"] != len(t_leaves):
      raise ValueError(f"checkpoint {path} holds {meta['num_leaves']} leaves but the template "
                       f"has {len(t_leaves)}: it was written by a different configuration.")
    leaves = []
    for i, t in enumerate(t_leaves):
      arr = data[f"leaf_{i:05d}"]
      if _is_typed_key(t):
        leaves.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(t)))
        continue
      if arr.shape != np.shape(t):
        raise ValueError(f"checkpoint {path}: leaf {i} has shape {arr.shape}, the template "
                         f"expects {np.shape(t)}.")
      leaves.append(jax.numpy.asarray(arr, dtype=jax.numpy.result_type(t)))
  return meta["step"], treedef.unflatten(leaves), meta["extra"]
