"""Orbax checkpoints of what training changes; frozen towers are fingerprinted, not re-saved.

Layout of `<workdir>/checkpoints/<step>/` (one Orbax `CheckpointManager` step, atomic):
  state/   the train state pytree (trainable params, non-param model state, optimizer state,
           RNG key data, step) as sharded arrays: every host writes its shards, restore puts
           them back onto the target shardings (any mesh).
  data/    the input iterator state, one `process_<i>-of-<n>.json` per host (grain states are
           per host).
  meta/    JSON: step; `frozen`: the frozen parameters' source path (informational) and
           content fingerprint (sha256 over paths, dtypes, shapes and bytes); `data`: the
           global batch size and process count the iterator states belong to.

Multi-host. Every process calls save and restore; arrays are written and read collectively
(each host its shards) into one directory every host can reach: a shared file system or a
`gs://` bucket (Orbax takes either path). The model and optimizer state restore onto any mesh
and device count. The data iterator states do not: each host's state is a position in its own
shard of the shuffled split, and the shards change with the host count (or the global batch
size). `restore` then raises `DataStateMismatch`, saying why and how to go on (the same host
count, or `data="restart"`: iterators started afresh), rather than silently training on other
batches than an uninterrupted run would.

Frozen towers (an LLM, a vision encoder) are rebuilt by the model family from their source at
every start, so checkpoints stay small. `check_frozen` compares the fingerprint recorded in a
checkpoint with the weights built now and raises `FrozenWeightsChanged`, naming both sources
and hashes: trainable weights fitted to other frozen weights are silently wrong.

Saves are asynchronous (the step continues while arrays are written). Orbax's manager only logs
a failure of a background commit, so `Checkpointer.wait()` (called before every save, before
reading the latest step and at the end) re-checks that the pending step was committed and
raises `CheckpointError` naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import args as ocp_args
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from tiktalk_jax import sharding


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


class FrozenWeightsChanged(CheckpointError):
    """The frozen parameters differ from those a checkpoint was trained with."""


class DataStateMismatch(CheckpointError):
    """The checkpoint's data iterator states cannot continue on this run's hosts or batches."""


# ---------------------------------------------------------------------------------------------
# Per-host data iterator state (async JSON, one file per process).
# ---------------------------------------------------------------------------------------------


class DataStateHandler(json_checkpoint_handler.JsonCheckpointHandler):
    """Writes each host's iterator state to `process_<i>-of-<n>.json` in the background."""

    @staticmethod
    def _process_file() -> str:
        return f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    async def _save_fn(self, x, directory):
        # Serialising here (background thread) keeps the step loop free; a failure (disk full,
        # a non-JSON value) surfaces through the manager like any async save error.
        (directory / self._process_file()).write_text(json.dumps(x))

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
        del item, args
        path = directory / self._process_file()
        if not path.exists():
            written = sorted(p.name for p in directory.glob("process_*.json"))
            raise DataStateMismatch(
                f"{path} missing (the checkpoint holds {written}): it was written by another "
                f"number of processes than this run's {jax.process_count()}. " + _HOW_TO_PROCEED
            )
        return json.loads(path.read_text())


@ocp_args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp_args.CheckpointArgs):
    item: Any


@ocp_args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp_args.CheckpointArgs):
    item: Any = None


_HOW_TO_PROCEED = (
    "Each process reads its own shard of the shuffled split, so a position in one shard means "
    "nothing for another process count or global batch size; the model and optimizer state "
    "restore onto any mesh. To go on: resume with the checkpoint's process count and "
    "config.input.batch_size, or pass --data_resume=restart (train_and_evaluate("
    "data_resume='restart')) to continue from this checkpoint with the data iterators started "
    "afresh (examples seen before the checkpoint can be seen again, in another order)."
)


def check_data(
    recorded: Mapping[str, Any] | None, current: Mapping[str, Any] | None, where: str
) -> None:
    """Raises `DataStateMismatch` when the iterator states `recorded` in a checkpoint (global
    batch size, process count) do not fit the `current` run."""
    if not recorded or not current:
        return
    changed = [
        f"{k} {recorded.get(k)} -> {current.get(k)}"
        for k in ("process_count", "global_batch_size")
        if recorded.get(k) != current.get(k)
    ]
    if changed:
        raise DataStateMismatch(
            f"The data iterator states of {where} cannot resume exactly: {', '.join(changed)}. "
            + _HOW_TO_PROCEED
        )


# ---------------------------------------------------------------------------------------------
# PRNG keys and fingerprints.
# ---------------------------------------------------------------------------------------------


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
    """Typed PRNG key arrays -> their uint32 key data (what array checkpoints can store)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def data_to_keys(tree: Any, like: Any) -> Any:
    """Inverse of `keys_to_data`, guided by a tree `like` holding the original key arrays."""
    return jax.tree.map(
        lambda x, l: jax.random.wrap_key_data(x, impl=jax.random.key_impl(l)) if _is_key(l) else x,
        tree,
        like,
    )


def _host_array(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def fingerprint(tree: Any) -> dict[str, Any]:
    """Content hash of a pytree of arrays: sha256 over (path, dtype, shape, bytes) by path.

    Independent of the mesh and of the host count (arrays are hashed whole). Costs one
    host copy of the tree (seconds per GB): computed once per start, only for frozen weights.
    """
    leaves = sorted(sharding.leaves_with_paths(keys_to_data(tree)), key=lambda kv: kv[0])
    digest = hashlib.sha256()
    count = 0
    for path, leaf in leaves:
        arr = np.ascontiguousarray(_host_array(leaf))
        digest.update(f"{path}|{arr.dtype.str}|{arr.shape}\n".encode())
        digest.update(arr.tobytes())
        count += arr.size
    return {"sha256": digest.hexdigest(), "num_arrays": len(leaves), "num_params": int(count)}


def frozen_record(tree: Any, source: str | None) -> dict[str, Any]:
    """What a checkpoint records about the frozen parameters."""
    return {"source": source, **fingerprint(tree)}


def check_frozen(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], where: str):
    """Raises `FrozenWeightsChanged` when `current` frozen weights differ from `recorded`."""
    recorded = recorded or {"source": None, "sha256": None, "num_arrays": 0, "num_params": 0}
    if recorded.get("sha256") == current.get("sha256"):
        return
    if not recorded.get("num_arrays") and not current.get("num_arrays"):
        return

    def desc(r):
        return (
            f"{r.get('num_arrays', 0)} arrays / {r.get('num_params', 0)} params from "
            f"{r.get('source') or '<built by the model family>'} (sha256 {r.get('sha256')})"
        )

    raise FrozenWeightsChanged(
        f"The frozen weights differ from those the checkpoint {where} was trained with.\n"
        f"  checkpoint: {desc(recorded)}\n"
        f"  now:        {desc(current)}\n"
        "The trainable weights were fitted to the recorded frozen weights. Point the config "
        "back at the original frozen weights (and the same `frozen` regex), or train in a "
        "fresh workdir."
    )


# ---------------------------------------------------------------------------------------------
# The manager.
# ---------------------------------------------------------------------------------------------


def abstract_like(tree: Any) -> Any:
    """`ShapeDtypeStruct`s (with shardings) for a pytree of arrays: a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def committed_steps(directory: str) -> list[int]:
    """The steps of `directory` whose save committed (Orbax's `_CHECKPOINT_METADATA` written),
    ascending; read-only (unlike `Checkpointer`, which prunes and creates), so it is safe on
    another run's directory, even one still training."""
    path = epath.Path(directory)
    if not path.is_dir():
        return []
    return sorted(
        int(child.name)
        for child in path.iterdir()
        if child.name.isdigit() and (child / "_CHECKPOINT_METADATA").exists()
    )


def read_state(directory: str, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """Reads, read-only, the parts of checkpoint `step` in `directory` that `target` names
    (a pytree of arrays laid out like the saved state, e.g. `{"params": ...}`; the rest, such
    as the optimizer state, is not read) onto `target`'s shardings.

    Returns `(tree, meta)`: `tree` with `target`'s structure, the checkpoint's meta record.
    """
    data = keys_to_data(target)
    abstract = abstract_like(data)
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True,
                ),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except Exception as e:
        raise CheckpointError(f"restoring step {step} from {directory} failed: {e}") from e
    finally:
        manager.close()
    return data_to_keys(restored["state"], target), dict(restored["meta"])


_TMP_MARK = ".orbax-checkpoint-tmp"


def _remove_partial_steps(directory: str) -> None:
    """Deletes the temporary directories of saves a killed run never committed.

    Orbax's own `cleanup_tmp_directories` removes them concurrently, nested temporary item
    directories included, and its parallel rmtrees race (FileNotFoundError on the next save).
    """
    path = epath.Path(directory)
    if jax.process_index() == 0 and path.is_dir():
        for child in path.iterdir():
            if _TMP_MARK in child.name:
                logging.warning("removing the uncommitted checkpoint %s", child.name)
                child.rmtree()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tiktalk_jax.checkpoint.remove_partial_steps")


class Checkpointer:
    """Async save / restore of `(state, data_state, meta)` with keep-last-K.

    Args:
      directory: where steps are written (created).
      keep: how many of the latest checkpoints to keep.
      async_save: write in a background thread (the default; False for debugging).
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        # A local path (made absolute) or a URL such as gs://bucket/run/checkpoints.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._pending: int | None = None
        _remove_partial_steps(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
        )

    def latest_step(self) -> int | None:
        self.wait()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.wait()
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any, meta: Mapping[str, Any]) -> None:
        """Starts an async save of step `step` (raises if the previous save failed)."""
        self.wait()
        if step in self.manager.all_steps():
            return  # e.g. SIGTERM right after a periodic save: nothing new to write
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(keys_to_data(state)),
            data=DataStateSave(data_state),
            meta=ocp.args.JsonSave({"step": int(step), **meta}),
        )
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:
            raise CheckpointError(f"saving the checkpoint of step {step} failed: {e}") from e
        self._pending = step

    def wait(self) -> None:
        """Blocks until the pending save is committed; raises `CheckpointError` if it failed."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            self.manager.reload()  # the manager's step list may have dropped steps
            raise CheckpointError(
                f"the async save of step {step} in {self.directory} failed: {e}"
            ) from e
        if step is None:
            return
        self.manager.reload()
        if step not in self.manager.all_steps():
            raise CheckpointError(
                f"the async save of step {step} in {self.directory} did not commit (see the "
                "Orbax error logged above); the latest complete step is "
                f"{self.manager.latest_step()}"
            )

    def restore(
        self,
        step: int,
        target: Any,
        *,
        data_info: Mapping[str, Any] | None = None,
        data: str = "exact",
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Restores step `step` onto `target` (a pytree of arrays or ShapeDtypeStructs).

        Args:
          step: the checkpoint step.
          target: the state's structure and shardings (any mesh).
          data_info: this run's `{"global_batch_size", "process_count"}`, checked against
            the checkpoint's (`check_data`).
          data: "exact" raises `DataStateMismatch` when this process's iterator state cannot
            resume exactly; "restart" logs why and returns None as the data state instead.

        Returns `(state, data_state, meta)`; `state` has `target`'s structure and shardings,
        PRNG keys included; `data_state` is this process's iterator state (or None).
        """
        if data not in ("exact", "restart"):
            raise ValueError(f"data must be 'exact' or 'restart', got {data!r}")
        self.wait()
        state_args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(keys_to_data(target))),
            meta=ocp.args.JsonRestore(),
        )
        restored = self._restore(step, state_args)
        meta = dict(restored["meta"])
        data_state = None
        try:
            check_data(meta.get("data"), data_info, f"{self.directory}/{step}")
            data_state = self._restore(step, ocp.args.Composite(data=DataStateRestore()))["data"]
        except DataStateMismatch as e:
            if data == "exact":
                raise
            logging.warning("%s\ndata='restart': the data iterators start afresh.", e)
        state = data_to_keys(restored["state"], target)
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return state, data_state, meta

    def _restore(self, step: int, args: ocp.args.Composite) -> Any:
        try:
            return self.manager.restore(step, args=args)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"restoring step {step} from {self.directory} failed: {e}. If the model or the "
                "`frozen` regex changed since it was written, train in a fresh workdir."
            ) from e

    def close(self) -> None:
        """Waits for the pending save (raising if it failed) and releases the manager."""
        try:
            self.wait()
        finally:
            self.manager.close()
