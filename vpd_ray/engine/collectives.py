"""Agreement between ranks: one all-reduced flag per micro-batch (or eval batch) carries both "my
loss is not finite" and "my input failed", so a deterministic error on one rank stops every rank
at the same point, with the failing rank's message, instead of leaving the others in a collective.

Flag values, reduced with MAX: 0 fine, 1 non-finite loss, 2 + rank: that rank hit an
:class:`~vpd_ray.errors.InputError` (the message is then broadcast from it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vpd_ray.errors import InputError, original_message

NONFINITE, FAILED = 1, 2  # 0: fine


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def flag_of(error: InputError | None, loss: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """This rank's flag as a device tensor (no host sync): failed, else whether ``loss`` is not finite."""
    if error is not None or loss is None:
        return torch.tensor([FAILED + rank()], dtype=torch.int64, device=device)
    return (~torch.isfinite(loss.detach())).long().reshape(1).to(device)


def agree(flag: torch.Tensor) -> int:
    """The MAX of every rank's flag (one all-reduce, one host sync)."""
    if distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def raise_if_failed(status: int, error: InputError | None) -> None:
    """After :func:`agree`: when a rank failed, every rank raises its error (same class, same message)."""
    if status < FAILED:
        return
    source = status - FAILED
    payload = [(type(error), original_message(error)) if error is not None else None]
    if distributed():
        dist.broadcast_object_list(payload, src=source)
    kind, message = payload[0]
    raise kind(message if source == rank() else f"{message} (on rank {source})")
