"""Rank agreement on a real two-process gloo group (no Ray): the flag every rank sees, and the failing
rank's error raised on every rank. The Ray tests cover the same path end to end, but take minutes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vpd_ray.engine import collectives
from vpd_ray.errors import DataError
from conftest import free_port


def _rank_body(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        fine = collectives.agree(collectives.flag_of(None, torch.tensor(1.0), torch.device("cpu")))
        nan = torch.tensor(float("nan") if rank == 0 else 1.0)
        nonfinite = collectives.agree(collectives.flag_of(None, nan, torch.device("cpu")))
        error = DataError("shard x.tar: bad jpeg") if rank == 1 else None
        status = collectives.agree(collectives.flag_of(error, None if error else torch.tensor(1.0),
                                                       torch.device("cpu")))
        try:
            collectives.raise_if_failed(status, error)
            raised = None
        except DataError as caught:
            raised = str(caught)
        results[rank] = (collectives.rank(), fine, nonfinite, status, raised)
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_and_raise_the_failing_ranks_message():
    results = mp.Manager().dict()
    mp.spawn(_rank_body, args=(free_port(), results), nprocs=2, join=True)
    zero, one = results[0], results[1]
    assert zero[:4] == (0, 0, collectives.NONFINITE, collectives.FAILED + 1)
    assert one[:4] == (1, 0, collectives.NONFINITE, collectives.FAILED + 1)
    assert one[4] == "shard x.tar: bad jpeg"
    assert zero[4] == "shard x.tar: bad jpeg (on rank 1)"


def test_single_process_is_rank_zero_and_needs_no_group():
    assert not collectives.distributed() and collectives.rank() == 0
    assert collectives.agree(collectives.flag_of(None, torch.tensor(float("inf")), torch.device("cpu"))) == 1
