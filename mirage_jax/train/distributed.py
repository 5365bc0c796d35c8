"""Join the JAX processes of a multi-host run, or stay single-process.

Order of precedence: explicit flags (`--coordinator_address --num_processes --process_id`), then the
MIRAGE_COORDINATOR_ADDRESS / MIRAGE_NUM_PROCESSES / MIRAGE_PROCESS_ID variables that launch/local.py
sets, then the cluster's own variables, which `jax.distributed.initialize()` detects by itself
(TPU VM and GKE TPU metadata, SLURM, Open MPI, Kubernetes JobSet). No such variable: one process.
"""

from __future__ import annotations

import os

import jax
from absl import logging

CLUSTER_HINTS = (
    "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
    "JOBSET_NAME", "TPU_WORKER_ID",
)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Call `jax.distributed.initialize` when this is (or is told to be) one of several processes."""
    coordinator_address = coordinator_address or os.environ.get("MIRAGE_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("MIRAGE_NUM_PROCESSES"):
        num_processes = int(os.environ["MIRAGE_NUM_PROCESSES"])
    if process_id is None and os.environ.get("MIRAGE_PROCESS_ID"):
        process_id = int(os.environ["MIRAGE_PROCESS_ID"])
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if explicit:
        missing = [n for n, v in (("--coordinator_address", coordinator_address), ("--num_processes", num_processes),
                                  ("--process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-process run: {', '.join(missing)} missing (give all three, or none to let "
                             "JAX detect the cluster)")
        if num_processes == 1:
            return
        _preemption_service_off()
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif any(v in os.environ for v in CLUSTER_HINTS):
        _preemption_service_off()
        jax.distributed.initialize()
    else:
        return
    logging.info("joined as process %d of %d (%d local / %d global devices)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _preemption_service_off() -> None:
    """JAX's preemption sync manager would install its own SIGTERM handler over ours and misses notices on
    resumed runs (see train/preemption.py); the loop agrees on the stop step itself."""
    jax.config.update("jax_enable_preemption_service", False)
