"""In-memory training batches: where the volumes live, what a gather returns, the seeded epoch
order and the batched augmentation's promises (identity at strength 0, its documented ranges)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from datasets import Cohort, CohortSpec
from trainables import batches
from trainables.fold import FoldData
from trainables.batches import (
    DEVICE_SHARE,
    PLACEMENTS,
    BatchAugmentation,
    InMemoryBatches,
    VolumeCache,
    _gather_rows,
    _rotation,
    fits_on_device,
)

GIB = 2**30


def _labelled_volumes(n: int, channels: int = 2, shape=(3, 4, 2)) -> np.ndarray:
    """float16 [n, C, X, Y, Z] whose row r holds the value r everywhere (exact in float16 for r < 2048):
    which rows a gather returned can be read off its values."""
    return np.broadcast_to(np.arange(n, dtype=np.float16).reshape(n, 1, 1, 1, 1), (n, channels, *shape)).copy()


# -- fits_on_device ---------------------------------------------------------------------------

def test_volumes_go_to_the_gpu_only_within_the_trials_share_of_its_memory():
    gib = 2**30
    assert fits_on_device(10 * gib, free=79 * gib, total=80 * gib)  # the reference cohort on an idle H100
    assert not fits_on_device(10 * gib, free=30 * gib, total=80 * gib)  # most of it taken by others
    # Four trials on one GPU start together and each sees it empty: each may take a quarter of its quarter.
    assert not fits_on_device(10 * gib, free=80 * gib, total=80 * gib, gpu_fraction=0.25)
    assert fits_on_device(5 * gib, free=80 * gib, total=80 * gib, gpu_fraction=0.25)
    assert fits_on_device(10 * gib, free=80 * gib, total=80 * gib, gpu_fraction=2.0)  # two whole GPUs: each is whole


def test_fits_on_device_boundary_is_inclusive_at_exactly_the_device_share():
    # 4 GiB idle GPU: the limit is DEVICE_SHARE of it, exactly 1 GiB; one byte more no longer fits.
    assert DEVICE_SHARE == 0.25
    assert fits_on_device(GIB, free=4 * GIB, total=4 * GIB)
    assert not fits_on_device(GIB + 1, free=4 * GIB, total=4 * GIB)
    assert fits_on_device(0, free=0, total=4 * GIB)  # nothing to upload always fits


def test_fits_on_device_takes_the_smaller_of_free_memory_and_the_trials_share():
    # free binds: 2 GiB free of 80 -> limit 0.5 GiB, whatever the total.
    assert fits_on_device(GIB // 2, free=2 * GIB, total=80 * GIB)
    assert not fits_on_device(GIB // 2 + 1, free=2 * GIB, total=80 * GIB)
    # the trial's share binds: half of an idle 8 GiB GPU -> limit 1 GiB although 8 are free.
    assert fits_on_device(GIB, free=8 * GIB, total=8 * GIB, gpu_fraction=0.5)
    assert not fits_on_device(GIB + 1, free=8 * GIB, total=8 * GIB, gpu_fraction=0.5)
    # a fraction above 1 (a trial holding several GPUs) allows no more than one device's own memory.
    assert fits_on_device(2 * GIB, free=8 * GIB, total=8 * GIB, gpu_fraction=4.0)
    assert not fits_on_device(2 * GIB + 1, free=8 * GIB, total=8 * GIB, gpu_fraction=4.0)


# -- VolumeCache ------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_volume_cache_on_the_cpu_reads_the_host_array_whatever_the_placement(placement):
    # Only a CUDA device ever gets an uploaded copy; "device" on the CPU must not copy the cohort.
    volumes = _labelled_volumes(6)
    cache = VolumeCache(volumes, "cpu", placement)
    assert not cache.on_device and cache.resident is None
    assert cache.device == torch.device("cpu")
    rows = np.array([5, 0, 5, 2], dtype=np.int32)  # any integer dtype, repeats allowed
    out = cache.gather(rows)
    assert out.shape == (4, *volumes.shape[1:]) and out.dtype == torch.float32 and out.device.type == "cpu"
    np.testing.assert_array_equal(out.numpy(), volumes[rows].astype(np.float32))
    out.fill_(-1.0)  # "a new tensor the caller may keep": writing it must not reach the cohort
    np.testing.assert_array_equal(volumes, _labelled_volumes(6))
    assert cache.gather(np.array([], dtype=np.int64)).shape == (0, *volumes.shape[1:])


def test_volume_cache_reads_a_read_only_shared_array_without_warning():
    # Ray's object store hands out read-only arrays; torch warns on wrapping them unless filtered.
    volumes = _labelled_volumes(3)
    volumes.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = VolumeCache(volumes, "cpu")
    np.testing.assert_array_equal(cache.gather(np.array([2, 1])).numpy(), [volumes[2], volumes[1]])


def test_unknown_placement_names_the_choices():
    with pytest.raises(ValueError, match=r"placement must be one of \('auto', 'device', 'host'\), got 'cuda'"):
        VolumeCache(_labelled_volumes(2), "cpu", "cuda")


@pytest.mark.parametrize("chunk_rows", [0.5, 1, 2, 5, 100])
def test_upload_in_chunks_copies_every_row_and_gathers_from_the_resident_copy(monkeypatch, chunk_rows):
    """The chunked upload and the resident gather are the GPU path; run here on the CPU by calling
    the upload directly, with chunks smaller than a row, dividing the rows, leaving a remainder
    and larger than the array."""
    volumes = _labelled_volumes(5)
    monkeypatch.setattr(batches, "_UPLOAD_CHUNK_BYTES", int(chunk_rows * volumes[:1].nbytes))
    cache = VolumeCache(volumes, "cpu")
    cache.resident = cache._upload()
    assert cache.on_device and cache.resident.dtype == torch.float16
    np.testing.assert_array_equal(cache.resident.numpy(), volumes)
    rows = np.array([4, 4, 1, 3])
    gathered = cache.gather(rows)
    assert gathered.dtype == torch.float32
    np.testing.assert_array_equal(gathered.numpy(), volumes[rows].astype(np.float32))


def test_gather_rows_copies_exactly_the_requested_rows_in_order_into_out():
    source = torch.from_numpy(_labelled_volumes(7))
    out = torch.full((5, *source.shape[1:]), -1.0)
    rows = np.array([6, 0, 3, 3, 1])
    returned = _gather_rows(source, rows, out)
    assert returned is out  # fills the caller's buffer (the reused pinned staging on a GPU)
    assert out.dtype == torch.float32  # converted from float16 on the way
    assert [torch.unique(out[i]).tolist() for i in range(5)] == [[6.0], [0.0], [3.0], [3.0], [1.0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.sh runs it)")
@pytest.mark.parametrize("placement", ["auto", "device", "host"])
def test_volume_cache_on_a_gpu_gives_the_host_values(small_store, placement):
    cohort = Cohort(small_store, CohortSpec())
    volumes = cohort.store.images(cohort.slots)
    cache = VolumeCache(volumes, "cuda", placement)
    assert cache.on_device == (placement != "host")  # a small cohort always fits
    rows = np.array([3, 0, 3, 1])
    first = cache.gather(rows)
    second = cache.gather(rows[::-1].copy())  # on the host path: the staging buffer is reused
    assert first.device.type == "cuda" and first.dtype == torch.float32
    assert np.array_equal(first.cpu().numpy(), volumes[rows].astype(np.float32))
    assert np.array_equal(second.cpu().numpy(), volumes[rows[::-1]].astype(np.float32))


# -- InMemoryBatches --------------------------------------------------------------------------

def test_in_memory_batches_equal_the_store(small_store):
    cohort = Cohort(small_store, CohortSpec())
    data = FoldData.from_cohort(cohort, cohort.folds(2, seed=0), 0, cohort.store.images(cohort.slots))
    data.volumes.flags.writeable = False  # as the node's shared copy from Ray's object store
    cache = VolumeCache(data.volumes, "cpu")
    assert not cache.on_device  # the CPU reads the host array in place
    memory = InMemoryBatches(cache, data.volume_rows)
    positions = data.train[:3]
    expected = np.stack([data.store.image(int(s)) for s in data.slots[positions]]).astype(np.float32)
    first = memory.images(positions)
    assert first.dtype == torch.float32 and np.array_equal(first.numpy(), expected)
    memory.images(data.train[3:6])
    assert np.array_equal(first.numpy(), expected), "a later gather overwrote an earlier batch"
    rows = np.arange(len(data.slots))[::-1].copy()  # a cohort that is a reordered subset of the cache
    reordered = InMemoryBatches(cache, rows)
    assert np.array_equal(reordered.images(np.array([0, 1])).numpy(), data.volumes[rows[:2]].astype(np.float32))
    order = InMemoryBatches.order(10, 4, torch.Generator().manual_seed(0), drop_last=True)
    assert [len(o) for o in order] == [4, 4] and len(set(np.concatenate(order))) == 8


def test_epoch_without_drop_last_gathers_every_training_row_exactly_once():
    """A fold whose patients are a reordered subset of the cached cohort (`rows`): one epoch of
    batches reads each of its rows once, through the position -> row map, and no other row."""
    volumes = _labelled_volumes(20)
    rows = np.array([17, 3, 8, 0, 11, 19, 5, 2, 14, 9, 6])  # fold position -> cache row
    memory = InMemoryBatches(VolumeCache(volumes, "cpu"), rows)
    order = InMemoryBatches.order(len(rows), 4, torch.Generator().manual_seed(7), drop_last=False)
    assert [len(b) for b in order] == [4, 4, 3]  # the short last batch is kept
    seen = []
    for positions in order:
        images = memory.images(positions)
        seen += [int(images[i].unique().item()) for i in range(len(positions))]
        assert seen[-len(positions):] == rows[positions].tolist()  # batch i is fold positions order[i]
    assert sorted(seen) == sorted(rows.tolist())


def test_epoch_order_with_drop_last_drops_only_the_short_tail_of_one_permutation():
    order = InMemoryBatches.order(10, 4, torch.Generator().manual_seed(3), drop_last=True)
    full = InMemoryBatches.order(10, 4, torch.Generator().manual_seed(3), drop_last=False)
    assert [len(b) for b in order] == [4, 4]
    # The kept batches are the first two of the same shuffle; the 2 left out are its tail.
    assert all(np.array_equal(a, b) for a, b in zip(order, full[:2]))
    assert sorted(np.concatenate(full).tolist()) == list(range(10))
    exact = InMemoryBatches.order(8, 4, torch.Generator().manual_seed(3), drop_last=True)
    assert [len(b) for b in exact] == [4, 4]  # nothing to drop when the batch size divides the count


def test_epoch_order_never_is_empty_when_the_fold_is_smaller_than_a_batch():
    # drop_last with fewer patients than a batch would leave an epoch without a step; the code
    # then returns the whole shuffle as one batch instead (fold.py only sets drop_last when
    # count > batch, so this is the safety net).
    order = InMemoryBatches.order(3, 4, torch.Generator().manual_seed(0), drop_last=True)
    assert len(order) == 1 and sorted(order[0].tolist()) == [0, 1, 2]


def test_epoch_order_is_reproducible_for_a_seed_and_differs_for_another():
    def shuffle(seed):
        return np.concatenate(InMemoryBatches.order(50, 8, torch.Generator().manual_seed(seed), drop_last=False))

    assert np.array_equal(shuffle(11), shuffle(11))
    assert not np.array_equal(shuffle(11), shuffle(12))
    assert not np.array_equal(shuffle(11), np.arange(50))  # actually shuffled
    # Consecutive epochs drawn from one generator differ (the trainer re-seeds per epoch instead).
    generator = torch.Generator().manual_seed(11)
    first, second = (np.concatenate(InMemoryBatches.order(50, 8, generator, False)) for _ in range(2))
    assert not np.array_equal(first, second)


# -- BatchAugmentation ------------------------------------------------------------------------

def test_batch_augmentation_is_seeded_shape_preserving_and_identity_at_zero():
    images = torch.randn(16, 2, 12, 10, 8)
    assert BatchAugmentation(0.0)(images, torch.Generator().manual_seed(0)) is images
    first = BatchAugmentation(1.0)(images, torch.Generator().manual_seed(3))
    again = BatchAugmentation(1.0)(images, torch.Generator().manual_seed(3))
    other = BatchAugmentation(1.0)(images, torch.Generator().manual_seed(4))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert torch.equal(first, again) and not torch.equal(first, other)
    changed = [not torch.allclose(first[i], images[i]) for i in range(16)]
    assert 4 <= sum(changed) <= 16


def test_batch_augmentation_flips_left_right_only_and_identity_affine_is_exact():
    assert torch.allclose(_rotation(torch.zeros(2, 3)), torch.eye(3).expand(2, 3, 3))
    images = torch.randn(64, 1, 6, 5, 4)
    # Strength tiny: affine/intensity/noise nearly identity, flips still happen with p 0.5.
    out = BatchAugmentation(1e-6)(images, torch.Generator().manual_seed(1))
    flipped = [torch.allclose(out[i], images[i].flip(1), atol=1e-4) for i in range(64)]
    kept = [torch.allclose(out[i], images[i], atol=1e-4) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 20 <= sum(flipped) <= 44


@pytest.mark.parametrize("strength", [0.0, -0.5])
def test_zero_or_negative_strength_returns_the_batch_untouched_and_draws_nothing(strength):
    # Drawing nothing keeps the generator's later draws (the rest of the epoch) unchanged.
    images = torch.randn(4, 2, 5, 5, 5)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert BatchAugmentation(strength)(images, generator) is images
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_augmentation_keeps_shape_and_dtype_and_never_writes_its_input(dtype):
    images = torch.randn(32, 3, 8, 7, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = images.clone()
    out = BatchAugmentation(1.0)(images, torch.Generator().manual_seed(5))
    assert out.shape == images.shape and out.dtype == dtype and out is not images
    assert torch.equal(images, before), "the input batch (the cache's gather) was modified in place"
    again = BatchAugmentation(1.0)(images, torch.Generator().manual_seed(5))
    assert torch.equal(out, again)


def test_rotation_matrices_are_proper_rotations_about_the_named_axes():
    angles = torch.empty(16, 3).uniform_(-np.pi, np.pi, generator=torch.Generator().manual_seed(0))
    r = _rotation(angles)
    assert r.shape == (16, 3, 3)
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(3).expand(16, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(16), atol=1e-5, rtol=0)
    # A quarter turn about the third axis alone maps the first axis onto the second.
    quarter = _rotation(torch.tensor([[0.0, 0.0, np.pi / 2]]))[0]
    torch.testing.assert_close(quarter @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]),
                               atol=1e-6, rtol=0)
    about_first = _rotation(torch.tensor([[0.3, 0.0, 0.0]]))[0]
    torch.testing.assert_close(about_first @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))


def _decomposed(strength: float, seed: int = 2, shape=(256, 4, 12, 12, 12)):
    """The augmentation's draws do not depend on the pixel values, so three calls with one seed
    on zeros, ones and a random batch x separate its parts: out(0) = shift + noise, the
    scale a = out(1) - out(0) at the centre voxel (which stays inside the volume under the small
    rotation/zoom) and the spatial transform T(x) = (out(x) - out(0)) / a."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    augment = BatchAugmentation(strength)
    zero, one, moved = (augment(v, torch.Generator().manual_seed(seed)) for v in (torch.zeros(shape), torch.ones(shape), x))
    centre = tuple(n // 2 for n in shape[2:])
    a = (one - zero)[(slice(None), slice(None), *centre)]
    spatial = (moved - zero) / a.view(*shape[:2], 1, 1, 1)
    return x, zero, a, spatial


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
def test_intensity_jitter_changes_every_sequence_of_every_volume_within_its_documented_range(strength):
    """x -> a x + b with a in 1 +- 0.25 strength and b in +- 0.25 strength, drawn per volume and
    sequence and applied always (the module docstring: a global jitter let the network read
    tumour size off the normal tissue)."""
    _, zero, a, _ = _decomposed(strength)
    shift = zero.flatten(2).median(2).values  # b (noise, where drawn, has median ~0 over 1728 voxels)
    s = strength
    assert ((a >= 1 - 0.25 * s - 1e-4) & (a <= 1 + 0.25 * s + 1e-4)).all(), (a.min(), a.max())
    assert (shift.abs() <= 0.25 * s + 0.01).all(), shift.abs().max()
    # Every volume and sequence is changed, each sequence by its own draw (not one per volume) ...
    assert (torch.maximum((a - 1).abs(), shift.abs()) > 1e-4).all()
    for part in (a, shift):  # one draw per volume would make every difference 0; own draws: ~0.1% below 1e-4
        assert ((part[:, 1:] - part[:, :1]).abs() > 1e-4).float().mean() > 0.99
    # ... and the draws use the whole range, not a shrunken one (1,024 uniform draws each).
    assert (a - 1).abs().max() > 0.2 * s and shift.abs().max() > 0.2 * s


@pytest.mark.parametrize("strength, affine_p", [(0.5, 0.25), (1.0, 0.5), (2.0, 0.5)])
def test_flip_resampling_and_noise_happen_with_their_documented_probabilities(strength, affine_p):
    """Left-right flip p 0.5; rotation + scaling p 0.5 x strength (at most 0.5); Gaussian noise
    p 0.3 with SD at most 0.05 strength. Counted over 256 volumes (bounds ~4 binomial SD)."""
    x, zero, _, spatial = _decomposed(strength)
    n = x.shape[0]
    kept = torch.tensor([torch.allclose(spatial[i], x[i], atol=1e-3) for i in range(n)])
    flipped = torch.tensor([torch.allclose(spatial[i], x[i].flip(1), atol=1e-3) for i in range(n)])
    resampled = ~(kept | flipped)
    assert not (kept & flipped).any()
    assert abs(int(resampled.sum()) - affine_p * n) <= 4 * (affine_p * (1 - affine_p) * n) ** 0.5
    # Among the volumes not resampled, half are mirrored (flip is drawn independently of the affine).
    unmoved = int((kept | flipped).sum())
    assert abs(int(flipped.sum()) - unmoved / 2) <= 4 * (unmoved / 4) ** 0.5
    spread = zero.flatten(2).std(2)  # out(0) is a constant shift unless noise was added
    noisy = (spread > 1e-6).any(1)
    assert abs(int(noisy.sum()) - 0.3 * n) <= 4 * (0.21 * n) ** 0.5
    assert spread.max() <= 0.05 * strength * 1.1  # sample SD of the noise, drawn SD <= 0.05 strength
