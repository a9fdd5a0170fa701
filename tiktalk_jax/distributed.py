"""Multi-host start-up: when to call `jax.distributed.initialize`, and which data each host reads.

One process runs per host (TPU VM worker, GPU node) or per GPU; together they form one JAX
program over every device. `initialize` must run before anything touches a device.

When it initializes (`mode`):
  "auto"  (default) when the environment or the flags say the job has several processes:
            * explicit flags: `--coordinator_address`, `--num_processes`, `--process_id`
              (`--local_device_ids`), or the environment variables `JAX_COORDINATOR_ADDRESS`,
              `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (`JAX_LOCAL_DEVICE_IDS`);
            * SLURM: `srun` set `SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_PROCID`,
              `SLURM_LOCALID` and `SLURM_NTASKS` > 1 (JAX reads the coordinator and the process
              id from them, and gives each task the one GPU `SLURM_LOCALID`: a task per node
              must name its GPUs, `JAX_LOCAL_DEVICE_IDS=0,...,7`, as launch/slurm_gpu.sbatch
              does);
            * a multi-host Cloud TPU slice that names its workers (`TPU_WORKER_HOSTNAMES` or
              `TPU_PROCESS_ADDRESSES` with more than one host; GKE sets them). A TPU VM created
              with `gcloud compute tpus tpu-vm create` does not: its launch passes
              `--distributed=on` (launch/tpu_pod.sh) and JAX asks the metadata server.
          A single-process run (a laptop, one GPU box, a one-task `salloc`) initializes nothing.
  "on"    always; what is not given is auto-detected by JAX (TPU metadata, SLURM, Open MPI).
  "off"   never.

Which data a host reads. The input pipeline gives each host `global batch / count` examples per
step, shard `index` of `count` (`input_pipeline.train_dataset`). `data_shard(mesh)` derives
`(index, count)` from the mesh, not from `jax.process_index()`: a host must read exactly the
batch rows its devices hold, and when a model-parallel axis spans hosts, several hosts hold the
same rows and must read the same data (`jax.make_array_from_process_local_data` requires
replicas to agree). On the usual meshes (batch axes outermost) it is
`(process_index, process_count)`.

Environment for GPUs (XLA flags, memory fraction) belongs to the launch scripts, not to this
code: launch/README.md.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import NamedSharding

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The arguments of `jax.distributed.initialize` and why it is called.

    Attributes:
      reason: "flags", "env", "slurm", "tpu" or "forced" (mode "on").
      coordinator_address, num_processes, process_id, local_device_ids: None lets JAX
        auto-detect the value from the cluster environment.
    """

    reason: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int(value: str | int | None) -> int | None:
    return None if value in (None, "") else int(value)


def _ids(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if value in (None, ""):
        return None
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(","))
    return tuple(int(v) for v in value)


def detect(
    mode: str = "auto",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Setup | None:
    """What `initialize` would do: a `Setup`, or None for a single-process run.

    Flags win over the `JAX_*` environment variables; both win over cluster detection.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return None
    env = os.environ if environ is None else environ
    given = dict(
        coordinator_address=coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None,
        num_processes=_int(num_processes if num_processes is not None
                           else env.get("JAX_NUM_PROCESSES")),
        process_id=_int(process_id if process_id is not None else env.get("JAX_PROCESS_ID")),
        local_device_ids=_ids(local_device_ids if local_device_ids is not None
                              else env.get("JAX_LOCAL_DEVICE_IDS")),
    )  # fmt: skip
    ids = given.pop("local_device_ids")  # which local devices; never a reason to initialize
    from_flags = coordinator_address or num_processes is not None or process_id is not None
    if given["num_processes"] == 1:
        return None  # explicitly one process: nothing to coordinate
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing and mode != "on":
            raise ValueError(
                f"multi-process start-up needs coordinator_address, num_processes and "
                f"process_id; missing {missing} (flags --{' --'.join(missing)} or the "
                "JAX_* environment variables), or pass --distributed=on to let JAX detect them"
            )
        return Setup("flags" if from_flags else "env", **given, local_device_ids=ids)
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env.get("SLURM_NTASKS", "1")) > 1:
        return Setup("slurm", local_device_ids=ids)
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return Setup("tpu", local_device_ids=ids)
    if mode == "on":
        return Setup("forced", local_device_ids=ids)
    return None


def initialize(mode: str = "auto", **kwargs) -> bool:
    """Calls `jax.distributed.initialize` when `detect(mode, **kwargs)` says so.

    Returns True when this process joined a multi-process job. Call it first thing, before
    any device is touched (jax.devices(), an array). A second call is a no-op.
    """
    setup = detect(mode, **kwargs)
    if setup is None:
        return False
    if jax.distributed.is_initialized():
        return True
    args = {k: v for k, v in dataclasses.asdict(setup).items() if k != "reason"}
    if args["local_device_ids"] is not None:
        args["local_device_ids"] = list(args["local_device_ids"])
    logging.info("jax.distributed.initialize (%s): %s", setup.reason, args)
    jax.distributed.initialize(**args)
    logging.info(
        "process %d of %d: %d local devices of %d (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    return True


@functools.lru_cache(maxsize=16)
def data_shard(
    mesh: jax.sharding.Mesh, batch_axes: tuple[str, ...] = ("data", "fsdp")
) -> tuple[int, int]:
    """`(index, count)`: this host reads shard `index` of `count` equal shards of each batch.

    Derived from where the mesh puts the rows of a batch sharded over `batch_axes`: `count` is
    the number of distinct row blocks the processes hold and `index` the position of this
    process's block. Raises ValueError when a process's devices hold rows that are not one
    contiguous block, or blocks that overlap another process's without being equal (reorder
    the mesh's devices so that the batch axes are outermost).
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    rows = math.prod(mesh.shape[a] for a in axes)
    spec = jax.sharding.PartitionSpec(axes if axes else None)
    index_map = NamedSharding(mesh, spec).devices_indices_map((rows,))
    blocks: dict[int, set[int]] = {}
    for device, (sl,) in index_map.items():
        start, stop, _ = sl.indices(rows)
        blocks.setdefault(device.process_index, set()).update(range(start, stop))
    spans = {}
    for process, held in blocks.items():
        lo, hi = min(held), max(held) + 1
        if len(held) != hi - lo:
            raise ValueError(
                f"process {process} holds batch rows {sorted(held)} of {rows}: not one block; "
                "order the mesh devices so that the batch axes are outermost"
            )
        spans[process] = (lo, hi)
    distinct = sorted(set(spans.values()))
    size = distinct[0][1] - distinct[0][0]
    tiles = [lo == i * size and hi == lo + size for i, (lo, hi) in enumerate(distinct)]
    if not all(tiles) or len(distinct) * size != rows:
        raise ValueError(f"processes hold overlapping batch row blocks {spans} of {rows}")
    return distinct.index(spans[jax.process_index()]), len(distinct)
