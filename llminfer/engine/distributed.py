"""Running one model as N cooperating processes (torch.distributed: gloo on CPU, NCCL on CUDA).

Rank 0 owns the scheduler, tokenizer and sampler. Before each forward pass it broadcasts the step's inputs
(StepInputs: token ids, positions, KV slots, block tables); every rank runs the same forward over its share of
the weights and of the KV pool, and the collectives inside the parallel layers combine the partial results.
Only rank 0 samples; its tokens reach the other ranks as the next step's inputs, so all ranks agree.
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from llminfer.engine.model_runner import ModelRunner, StepInputs
from llminfer.parallel.communication import communication

logger = logging.getLogger(__name__)

TIMEOUT_S = float(os.environ.get("LLMINFER_TP_TIMEOUT", "30"))  # a silent peer is declared dead after this


def distributed_env() -> tuple[int, int]:
    """(rank, world size) as set by our launcher or torchrun; (0, 1) when not launched in parallel."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str) -> tuple[int, int]:
    rank, world = distributed_env()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
        logger.info("rank %d of %d joined the %s process group", rank, world, backend)
    return rank, world


class BroadcastingRunner(ModelRunner):
    """Rank 0's runner: every step's inputs go to the other ranks before the forward pass."""

    def __init__(self, model, cache, backend) -> None:
        super().__init__(model, cache, backend)
        self._closed = False
        atexit.register(self.close)

    def execute(self, step: StepInputs) -> torch.Tensor:
        communication.run(dist.broadcast_object_list, [step], 0)
        return super().execute(step)

    def close(self) -> None:
        """Tell the other ranks to stop (at exit, normal or not)."""
        if not self._closed and dist.is_initialized():
            self._closed = True
            try:
                dist.broadcast_object_list([None], src=0)
                leave_process_group()
            except Exception as exc:  # noqa: BLE001 - a peer already gone: nothing left to tell
                logger.warning("could not stop the other ranks: %s", exc)


def leave_process_group() -> None:
    """Every rank meets at a barrier, then tears the group down together.

    Left to interpreter shutdown, or torn down while a peer still has a collective in flight, gloo's threads
    abort the process (SIGABRT after a clean run).
    """
    dist.barrier()
    dist.destroy_process_group()


def share_cache_shape(num_blocks: int | None) -> int:
    """Rank 0 decides the KV pool size; every rank allocates the same number of blocks (its own heads)."""
    message = [num_blocks]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def follow(runner: ModelRunner) -> None:
    """A non-zero rank's whole life after loading: run each step rank 0 announces, until it says stop."""
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            return
        runner.execute(message[0])
