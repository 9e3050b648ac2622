"""Run work over batches of prompts, halving the batch on out-of-memory instead of crashing.

Every batched loop over prompts (capture, generation, scoring, gradients) goes through
`backed_off`: on a CUDA out-of-memory error (or the CPU allocator's) the cache is freed, the
batch halved and the same slice retried; the smaller size is kept for the slices after it, and for
the next loops of the same kind (`desc`) in this process, e.g. one per steering intervention.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

from engine.errors import ExplorerError

logger = logging.getLogger(__name__)

R = TypeVar("R")
CPU_ALLOCATOR_FAILURE = "DefaultCPUAllocator: can't allocate memory"
_fitted_sizes: dict[str, int] = {}  # desc: the batch size a loop of that kind last fell back to


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or any accelerator's) out-of-memory error, or the CPU allocator failing."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and CPU_ALLOCATOR_FAILURE in str(error))


def free_memory() -> None:
    """Drop unreachable tensors and hand cached CUDA blocks back, before a retry."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def backed_off(
    order: Sequence[int], work: Callable[[list[int]], R], *, batch_size: int, desc: str = "batch"
) -> Iterator[tuple[list[int], R]]:
    """(indices, work(indices)) for consecutive slices of `order`, in order, at most `batch_size`
    long. A slice that runs out of memory is retried at half its size, down to one item; the
    reduced size is kept for the rest, and a later loop with the same `desc` starts from it.
    `work` must not keep side effects of a failed attempt."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size, start = min(batch_size, _fitted_sizes.get(desc, batch_size)), 0
    if size < batch_size:
        logger.info("%s: batch size %d (an earlier %s loop ran out of memory at more)", desc, size, desc)
    while start < len(order):
        batch = list(order[start : start + size])
        try:
            result = work(batch)
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(error):
                raise
            if len(batch) == 1:
                raise ExplorerError(f"{desc}: out of memory on a single prompt.",
                                    "use a smaller dtype (bfloat16), spread the model over GPUs with "
                                    "generation.device_map, or use a GPU with more memory.") from error
        else:
            yield batch, result
            start += len(batch)
            continue
        # Out of memory, handled outside the except block, so the error's traceback (and its tensors) is gone.
        free_memory()
        size = _fitted_sizes[desc] = len(batch) // 2
        logger.warning("%s: out of memory at batch size %d, retrying at %d", desc, len(batch), size)
