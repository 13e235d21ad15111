"""`--tensor-parallel-size N` on one machine: start N copies of this command as ranks 0..N-1 and supervise them.

Each child gets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, as torchrun would set them (so
`torchrun --nproc-per-node N -m llminfer ...` works the same way, across machines too). Rank 0 keeps the
terminal; the others only report errors. If any rank fails, the rest are stopped and the error names the rank.
The process group listens on MASTER_ADDR (127.0.0.1 here): never expose it to an untrusted network.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_launchable(args) -> int:
    """Before any rank starts: the model must split by the requested size (the check each rank would make)."""
    if getattr(args, "model", None) is None:
        return 0
    from llminfer.loading import open_checkpoint
    from llminfer.model.auto import load_time_quantization
    from llminfer.parallel.sharding import check_tp_size

    checkpoint = open_checkpoint(args.model)
    check_tp_size(checkpoint.config, args.tensor_parallel_size, args.model,
                  load_time_quantization(checkpoint, getattr(args, "quantization", None)))
    return 0


def launch(argv: list[str], world_size: int) -> int:
    port = str(free_port())
    children: list[subprocess.Popen] = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        quiet = {} if rank == 0 else {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
        children.append(subprocess.Popen([sys.executable, "-m", "llminfer", *argv], env=env, **quiet))
    previous = signal.signal(signal.SIGTERM, lambda *_: _forward(children, signal.SIGTERM))
    try:
        return _supervise(children)
    except KeyboardInterrupt:
        _forward(children, signal.SIGINT)
        _stop(children)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _supervise(children: list[subprocess.Popen]) -> int:
    while True:
        codes = [child.poll() for child in children]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            rank, code = failed[0]
            _stop(children)
            cause = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            print(f"llminfer: error: tensor-parallel rank {rank} of {len(children)} failed ({cause}); "
                  f"stopped the other ranks", file=sys.stderr)
            return codes[0] if rank == 0 and code > 0 else 1
        if codes[0] == 0:  # rank 0 finished the job; the others follow it out
            deadline = time.monotonic() + GRACE_S
            while any(child.poll() is None for child in children) and time.monotonic() < deadline:
                time.sleep(0.05)
            _stop(children)
            return 0
        time.sleep(0.05)


def _forward(children: list[subprocess.Popen], sig: int) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(sig)


def _stop(children: list[subprocess.Popen]) -> None:
    _forward(children, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
