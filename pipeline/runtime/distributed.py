"""Into and out of torch.distributed for the CLIs: a world of one without the launcher, and a clean exit.

A process group left to interpreter teardown can abort the process after the
work is done: gloo's worker threads may still be joinable when their objects
are destroyed ("terminate called without an active exception", SIGABRT,
after the final checkpoint is already written). torch's documented shutdown
is ``destroy_process_group`` near the end of main; :func:`finish` first waits
at a barrier, so no rank tears its group down while another still has a
collective in flight. An exit handler destroys the group on every other
path (errors, ``sys.exit``); it does nothing once :func:`finish` has run.
"""

from __future__ import annotations

import atexit
import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .host_memory import return_freed_memory_to_os
from .ports import free_port


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Under the launcher the env is set; a plain process becomes a world of one. ``timeout_minutes``: how long
    a collective may wait for the slowest rank before the group fails (``distributed.timeout_minutes``)."""
    # CROSS_*: this node and the node count, which DeepSpeed's checkpoint writer reads; the deepspeed launcher and
    # launch/slurm_rank.sh set them, and the writers' "replica" unit (the only one ds_json allows) does not use them
    world_of_one = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**world_of_one, "CROSS_RANK": "0", "CROSS_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    import deepspeed  # seconds to import; only the entry points that start a process group pay

    # DeepSpeed calls collectives torch has deprecated (all_gather_into_tensor): one warning per call
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    return_freed_memory_to_os()  # before the model is loaded: every large block after this is mmapped
    from deepspeed.accelerator import get_accelerator

    # Each rank on its own device before any collective: NCCL refuses two ranks on one GPU, and
    # deepspeed.init_distributed does not pick the device (cuda:0 would be current on every rank).
    # The CPU accelerator's set_device does nothing.
    get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))
    shutdown_at_exit()


def local_device() -> torch.device:
    """This process's accelerator device (cuda:LOCAL_RANK on a GPU node; cpu on the CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator  # deepspeed: seconds to import

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))


def finish() -> None:
    """After a successful run, on every rank: wait for the others, then destroy the process groups."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    release_shared_memory()


def release_shared_memory() -> None:
    """Unlink this rank's all-reduce buffer of DeepSpeed's CPU shared-memory collectives.

    On the CPU accelerator every rank creates a 66 MB ``/dev/shm`` file named after MASTER_ADDR,
    MASTER_PORT and its rank, and nothing removes it: with a fresh port per run, each 2-rank run left
    132 MB in RAM-backed /dev/shm for good (20 GB after a day of test runs, until a run was OOM-killed).
    Unlinking is safe once no new rank will open it (mapped copies stay valid); GPUs create none.
    """
    addr, port, rank = (os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if addr and port and rank:
        for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
            buffer.unlink(missing_ok=True)


def shutdown_at_exit() -> None:
    atexit.register(_shutdown)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    release_shared_memory()
