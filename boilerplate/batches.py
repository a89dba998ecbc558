"""Batches: the one way the loop gets them, two ways to make them. Data that fits (tensors, with
--workers 0) lives on the device whole and a batch is a slice of a seeded permutation: no
per-sample Python, no copies. Any other (a Dataset of your own, or --workers N) goes through a
torch DataLoader: worker processes, pinned memory, non-blocking copies. Both shuffle with the
run's generator, whose state the checkpoint keeps, so a resumed run draws the same batches. Under
torchrun (`shard=True`), every rank draws the same order and takes its share of each batch (distributed.py).
"""

import multiprocessing
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

import utils

from . import distributed

VAL_SPLIT_SEED = 0  # a split held out is fixed: it never moves with --seed


@dataclass
class Data:
    """What an experiment's load_data returns: its splits, and what they are. The model's sizes, the
    baselines, the checks and W&B's config read this description."""

    splits: dict[str, Dataset]  # "train" and "test", and "val" if the data has its own (else --val_size holds it out)
    classes: list[str]  # the class names; the labels are 0 to len(classes) - 1
    input_shape: tuple[int, ...]  # one sample's


class DeviceBatches:
    def __init__(self, dataset: TensorDataset, device: torch.device):
        self.x, self.y = (t.to(device) for t in dataset.tensors)

    def __len__(self) -> int:
        return len(self.y)

    def labels(self) -> torch.Tensor:
        return self.y

    def part(self, start: int, end: int) -> "DeviceBatches":
        """Samples start to end (a view: nothing is copied)."""
        part = DeviceBatches.__new__(DeviceBatches)
        part.x, part.y = self.x[start:end], self.y[start:end]
        return part

    def batches(
        self, size: int, generator: torch.Generator | None = None, shard: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `size`, shuffled by `generator`, in order without one; with `shard`, this rank's share
        of each."""
        n = len(self.y)
        # The permutation is drawn on the CPU, the same on every device. On a GPU, a copy from pinned memory
        # is queued, not waited for: the epoch's head is no sync point (test_syncs' CUDA test).
        if generator:
            order, cuda = torch.randperm(n, generator=generator), self.y.device.type == "cuda"
            order = (order.pin_memory() if cuda else order).to(self.y.device, non_blocking=cuda)
        for i in range(0, n, size):
            start, end = distributed.bounds(min(size, n - i)) if shard else (0, size)
            index = order[i + start : min(i + end, n)] if generator else slice(i + start, min(i + end, n))
            yield self.x[index], self.y[index]


def quiet_worker(worker_id: int) -> None:
    """A DataLoader worker hears a terminal's Ctrl+C too (it is in the process group): the training
    process alone decides what a stop signal does."""
    for signum in utils.STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# CPython's after-fork code could deadlock the child when another thread held its thread-list lock at the
# fork (CPython gh-112275): Python 3.8 to 3.11 until their releases of September 2024; 3.12 on reorders it.
FORK_MAY_HANG = sys.version_info[:3] < (3, 10, 15) or (3, 11) <= sys.version_info[:3] < (3, 11, 10)


def worker_start() -> multiprocessing.context.BaseContext | None:
    """How DataLoader workers start: by fork() of the training process (torch's default), except under torchrun
    on a Python whose fork may hang. There gloo's threads run on while the DataLoader forks, and a fork while one
    of them held that lock deadlocked the new worker: a 2-rank job hung about once in thirty on 3.11.7. The
    workers then start from a fork server (as spawn: the main script runs again in each, and a Dataset must
    pickle), which first imports the packages loaded here, so that a worker starts in milliseconds, not in the
    seconds of importing torch (the server's own preload of "__main__" gets no path in Python 3.10 to 3.13)."""
    if not (FORK_MAY_HANG and distributed.world() > 1):
        return None
    context = multiprocessing.get_context("forkserver")
    loaded = {name.split(".")[0] for name, module in list(sys.modules.items()) if getattr(module, "__file__", None)}
    context.set_forkserver_preload(sorted(name for name in loaded if not name.startswith("_")))
    return context


class LoaderBatches:
    def __init__(self, dataset: Dataset, device: torch.device, workers: int):
        self.dataset, self.device, self.workers = dataset, device, workers

    def __len__(self) -> int:
        return len(self.dataset)

    def labels(self) -> torch.Tensor:
        return labels_of(self.dataset).to(self.device)

    def part(self, start: int, end: int) -> "LoaderBatches":
        return LoaderBatches(Subset(self.dataset, range(start, end)), self.device, self.workers)

    def batches(
        self, size: int, generator: torch.Generator | None = None, shard: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Without shuffling the loader still draws its workers' seed: from a generator of its own, then.
        how = {"batch_sampler": Shares(len(self.dataset), size, generator)} if shard else {"batch_size": size}
        loader = DataLoader(
            self.dataset,
            **how,
            shuffle=None if shard else generator is not None,
            generator=generator or torch.Generator(),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=quiet_worker,
            multiprocessing_context=worker_start() if self.workers else None,
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class Shares:
    """A DataLoader's batch sampler for one rank: the order a shuffling DataLoader draws (after the
    workers' seed), and of each batch of `size`, this rank's share."""

    def __init__(self, n: int, size: int, generator: torch.Generator | None):
        self.n, self.size, self.generator = n, size, generator

    def __len__(self) -> int:
        return -(-self.n // self.size)

    def __iter__(self) -> Iterator[list[int]]:
        # torch's own sampler, drawn to its end as a shuffling DataLoader draws it: the generator then moves
        # on as it does in one process (it draws a permutation more once the order is exhausted)
        order = list(RandomSampler(range(self.n), generator=self.generator)) if self.generator else range(self.n)
        for i in range(0, self.n, self.size):
            batch = order[i : i + self.size]
            start, end = distributed.bounds(len(batch))
            yield list(batch[start:end])


def batches_of(dataset: Dataset, device: torch.device, workers: int) -> DeviceBatches | LoaderBatches:
    if isinstance(dataset, TensorDataset) and not workers:
        return DeviceBatches(dataset, device)
    return LoaderBatches(dataset, device, workers)


def labels_of(dataset: Dataset) -> torch.Tensor:
    """Every label of a dataset, without loading its samples where it can."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices)]
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets)
    return torch.tensor([int(y) for _, y in dataset])


def hold_out(dataset: Dataset, size: int) -> tuple[Dataset, Dataset]:
    """Split `size` samples off by a permutation that depends on VAL_SPLIT_SEED alone: (the rest, those)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[order[size:]] for t in dataset.tensors)), TensorDataset(
            *(t[order[:size]] for t in dataset.tensors)
        )
    return Subset(dataset, order[size:].tolist()), Subset(dataset, order[:size].tolist())
