"""Multi-host start-up through jax.distributed.initialize (the scale-out engine; no home-made orchestration).

Where the coordinator, process count and id come from, in order:
1. explicit arguments (the CLI's --coordinator/--num-processes/--process-id),
2. JAXLAB_COORDINATOR, JAXLAB_NUM_PROCESSES, JAXLAB_PROCESS_ID (set by launch/local_multiprocess.py),
3. cluster auto-detection inside jax.distributed.initialize: SLURM (SLURM_JOB_ID with several tasks),
   Cloud TPU pods (TPU metadata), Open MPI / mpirun.
A plain single-process run calls nothing.
"""

from __future__ import annotations

import os

import jax


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def cluster_detected() -> str | None:
    """The name of the multi-process environment this process runs in, if any."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> bool:
    """Joins this process to the others; returns True if jax.distributed was initialised."""
    coordinator_address = coordinator_address or os.environ.get("JAXLAB_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int("JAXLAB_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAXLAB_PROCESS_ID")
    explicit = coordinator_address is not None
    if not explicit and cluster_detected() is None:
        return False
    if explicit and (num_processes is None or process_id is None):
        raise ValueError(
            "a coordinator address was given without the process count and id: set --num-processes and "
            "--process-id (or JAXLAB_NUM_PROCESSES and JAXLAB_PROCESS_ID)"
        )
    # CPU processes exchange collectives through gloo (the setting only affects the CPU client)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True

