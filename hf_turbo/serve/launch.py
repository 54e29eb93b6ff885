"""``hf-turbo serve --tensor-parallel-size N``: starts the N ranks itself, no torchrun command line.

Each rank is a process (``torch.multiprocessing``, spawn) that joins one process group (NCCL on CUDA,
one GPU per rank; gloo on the CPU), loads the model with transformers' ``tp_plan="auto"`` and builds the
same engine. Rank 0 serves HTTP; the others follow its plans (:mod:`hf_turbo.engine.follower`) until
rank 0's server stops. When any rank dies, the others are ended (torch.multiprocessing's rule) and the
command fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket

logger = logging.getLogger(__name__)

__all__ = ["run_tensor_parallel", "free_port"]


def free_port() -> int:
    """A TCP port on the loopback that is free now (the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tensor_parallel(args: argparse.Namespace) -> int:
    """Spawn ``args.tensor_parallel_size`` ranks and wait for them; 0 when rank 0's server stopped cleanly."""
    import torch
    import torch.multiprocessing as mp

    size = args.tensor_parallel_size
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda and torch.cuda.device_count() < size:
        raise ValueError(f"--tensor-parallel-size {size} needs {size} GPUs; {torch.cuda.device_count()} visible")
    if not cuda:  # the ranks share the CPU's cores: split them, or they oversubscribe each other
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // size)))
    context = mp.start_processes(_rank_main, args=(args, size, free_port(), cuda), nprocs=size, join=False,
                                 start_method="spawn")
    # Ctrl-C / SIGTERM reach this process only: pass them to rank 0, whose server then stops and closes the
    # group (the other ranks leave their loops), and keep waiting for all of them
    rank0 = context.processes[0].pid
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(rank0, signal.SIGINT))
    try:
        while True:
            try:
                if context.join():
                    return 0
            except KeyboardInterrupt:
                if context.processes[0].is_alive():
                    os.kill(rank0, signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _rank_main(rank: int, args: argparse.Namespace, size: int, master_port: int, cuda: bool) -> None:
    import torch
    import torch.distributed as dist

    from hf_turbo.serve.build import build_app, serve_app

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(size))
    if cuda:
        torch.cuda.set_device(rank)
        args.device = f"cuda:{rank}"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        app = build_app(args)  # every rank: the same model shard loading, config and engine
        if rank == 0:
            serve_app(app, args)
        else:
            logger.info("tensor-parallel rank %d follows rank 0", rank)
            app.state.hf_turbo.engine.engine.follow()
    finally:
        dist.destroy_process_group()
