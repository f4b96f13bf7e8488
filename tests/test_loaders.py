"""loaders.py: the positional training stream (ranks, resume, epochs), batches independent of
the worker count, evaluation order, worker seeding."""
import itertools
import random

import numpy as np
import pytest
import torch

from seglab.data.voc import VOCSegmentation
from seglab.data.demo import make_demo_dataset
from seglab.data.loaders import TrainSampler, eval_loader, sample_seed, train_loader, worker_init_fn
from seglab.training.distributed import dist_info
from seglab.data.transforms import EvalTransform, TrainTransform


def take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("voc"), num_train=5, num_val=3,
                             size=(40, 48), seed=2)


def test_stream_is_epochs_of_seeded_permutations():
    n, seed = 7, 3
    stream = take(TrainSampler(n, seed=seed), 5 * n)
    assert all(isinstance(i, int) and isinstance(s, int) for i, s in stream)
    epochs = [[i for i, _ in stream[e * n:(e + 1) * n]] for e in range(5)]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(n))  # each epoch is a permutation
        assert order == torch.randperm(
            n, generator=torch.Generator().manual_seed(seed + e)).tolist()
    assert len({tuple(o) for o in epochs}) > 1  # and the epochs are shuffled differently
    seeds = [s for _, s in stream]
    assert seeds == [sample_seed(seed, p) for p in range(5 * n)]
    assert len(set(seeds)) == len(seeds)
    assert take(TrainSampler(n, seed=seed), 20) == stream[:20]  # deterministic
    assert [i for i, _ in take(TrainSampler(n, seed=seed + 1), 3 * n)] != \
        [i for i, _ in stream[:3 * n]]
    # no two (job seed, position) pairs of nearby seeds share a sample seed
    assert len({sample_seed(s, p) for s in range(4) for p in range(1000)}) == 4000
    with pytest.raises(ValueError, match="empty"):
        TrainSampler(0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_interleaved_equal_one_rank(world_size):
    n, seed, count = 5, 11, 60
    single = take(TrainSampler(n, seed=seed), count * world_size)
    per_rank = [take(TrainSampler(n, seed=seed, rank=r, world_size=world_size), count)
                for r in range(world_size)]
    interleaved = [item for step in zip(*per_rank) for item in step]
    assert interleaved == single


@pytest.mark.parametrize("start", [0, 1, 4, 5, 13, 1001])
def test_resume_with_start_continues_the_stream(start):
    n, seed = 5, 2
    full = take(TrainSampler(n, seed=seed), start + 40)
    assert take(TrainSampler(n, seed=seed, start=start), 40) == full[start:]
    for r in range(2):
        assert take(TrainSampler(n, seed=seed, start=start, rank=r, world_size=2), 20) == \
            full[start + r::2][:20]


def assert_same_batch(a, b):
    assert a["id"] == b["id"] and a["size"] == b["size"]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_train_loader_batches_are_positional(demo):
    ds = VOCSegmentation(demo, "train", TrainTransform(crop=24))
    batch_size, seed, steps = 2, 5, 4
    batches = list(itertools.islice(train_loader(ds, batch_size, seed, num_workers=0), steps))
    first = batches[0]
    assert set(first) == {"image", "label", "id", "size"}
    assert first["image"].shape == (2, 3, 24, 24) and first["image"].dtype == torch.float32
    assert first["label"].shape == (2, 24, 24) and first["label"].dtype == torch.int64
    assert first["size"] == [(40, 48), (40, 48)] and len(first["id"]) == 2
    # batch b holds stream positions b*B .. b*B+B-1, each its sampler's (index, seed) item
    stream = take(TrainSampler(len(ds), seed), batch_size * steps)
    for b, batch in enumerate(batches):
        for j in range(batch_size):
            item = ds[stream[b * batch_size + j]]
            assert batch["id"][j] == item["id"]
            assert torch.equal(batch["image"][j], item["image"])
            assert torch.equal(batch["label"][j], item["label"])
    # two workers give the same batches; so does a resume at sample 4 (= batch 2)
    workers = train_loader(ds, batch_size, seed, num_workers=2)
    for batch in batches:
        assert_same_batch(next(workers), batch)
    del workers
    resumed = train_loader(ds, batch_size, seed, start=2 * batch_size)
    assert_same_batch(next(resumed), batches[2])
    assert_same_batch(next(resumed), batches[3])
    # rank 1 of 2 with batch 1: positions 1, 3, 5, ...
    rank1 = train_loader(ds, 1, seed, rank=1, world_size=2)
    for p in (1, 3, 5):
        got, item = next(rank1), ds[stream[p]]
        assert got["id"] == [item["id"]] and torch.equal(got["image"][0], item["image"])


def test_eval_loader_order(demo):
    ds = VOCSegmentation(demo, "val", EvalTransform("voc", pad_to=49))
    items = list(eval_loader(ds))
    assert [b["id"] for b in items] == ds.ids
    for n, batch in enumerate(items):
        item = ds[n]
        assert torch.equal(batch["image"], item["image"]) and batch["size"] == (40, 48)
        assert torch.equal(batch["label"], item["label"])
    assert [b["id"] for b in eval_loader(ds, num_workers=2)] == ds.ids
    assert len(ds) % 2 == 1  # an odd count: the stock DistributedSampler would repeat one
    ranks = [[b["id"] for b in eval_loader(ds, rank=r, world_size=2)] for r in range(2)]
    assert ranks == [ds.ids[0::2], ds.ids[1::2]]  # every image once over the ranks, in order
    assert len(eval_loader(ds, rank=1, world_size=2)) == len(ds) // 2


def test_dist_info_and_worker_seeding():
    assert dist_info() == (0, 1)
    torch.manual_seed(1234)
    worker_init_fn(0)
    assert random.random() == random.Random(1234).random()
    assert np.random.random() == np.random.RandomState(1234).random_sample()
    torch.manual_seed(2 ** 40 + 7)
    worker_init_fn(3)
    assert np.random.random() == np.random.RandomState(7).random_sample()
    assert torch.initial_seed() == 7
