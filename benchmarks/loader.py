"""Volumes per second into batches: NIfTI.gz + preprocessing every epoch vs the Zarr cohort store
vs the in-memory cache, measured side by side on the same patients.

    python -m benchmarks.loader [--n 24] [--workers 2] [--device cpu|cuda] [--out benchmarks/results/loader.md]

Builds (once, under --work) a synthetic export of --n patients and its cohort store at the
reference shape 120 x 120 x 78, then times one pass over the patients per pipeline, and last
trains a backbone with batches from the trainer's own path vs one reused batch, to show the share
of training time the loader costs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks._machine import describe, write_result
from datasets import CohortStore
from datasets.convert import convert
from datasets.preprocess import PreprocessConfig, preprocess_patient
from datasets.sequences import SequenceMatcher
from datasets.synthetic import SyntheticConfig, generate
from datasets.torch_data import CohortDataset, training_augmentation
from trainables.backbones import build_backbone
from trainables.batches import BatchAugmentation, InMemoryBatches, VolumeCache


class NiftiEveryEpoch(Dataset):
    """The anchor: decode NIfTI.gz and run the MONAI preprocessing for every item."""

    def __init__(self, folders: list[Path], config: PreprocessConfig):
        self.folders, self.config = folders, config
        self.matcher = SequenceMatcher(config.sequences)

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, item: int):
        folder = self.folders[item]
        files, _ = self.matcher.find(folder, folder.name)
        files.pop("label", None)
        torch.set_num_threads(1)
        return torch.from_numpy(preprocess_patient(files, folder.name, self.config).image.astype(np.float32))


def _rate(loader: DataLoader, n: int, passes: int = 1) -> float:
    start = time.perf_counter()
    seen = 0
    for _ in range(passes):
        for batch in loader:
            seen += len(batch["image"] if isinstance(batch, dict) else batch)
    assert seen == n * passes
    return seen / (time.perf_counter() - start)


def _batched_rate(batches: InMemoryBatches, n: int, device: torch.device,
                  augment: BatchAugmentation | None, passes: int = 3) -> float:
    """Volumes/s of the trainer's own path: shuffled index batches gathered (and augmented) on `device`."""
    generator = torch.Generator(device=device).manual_seed(0)
    start, seen = time.perf_counter(), 0
    for _ in range(passes):
        for order in InMemoryBatches.order(n, 4, torch.Generator().manual_seed(0), drop_last=False):
            images = batches.images(order)
            if augment is not None:
                images = augment(images, generator)
            seen += len(order)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def _training_rates(cache: VolumeCache, args) -> tuple[float, float]:
    """Training volumes/s of one backbone with batches gathered + augmented from `cache` every step,
    and with one batch made once and reused (no loader at all): their ratio is the share of
    training time the device computes rather than waits for the loader."""
    device = cache.device
    model = build_backbone(args.train_backbone, cache.volumes.shape[1], 1, args.train_width).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    augment = BatchAugmentation(1.0)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = np.random.default_rng(0).integers(0, len(cache.volumes), size=(args.train_steps + 1, args.train_batch))

    def batch(step: int) -> torch.Tensor:
        images = augment(cache.gather(rows[step]), generator)
        return images.contiguous(memory_format=torch.channels_last_3d) if cuda else images

    def train(images: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(images).float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    fixed = batch(0)
    rates = []
    for feed in (batch, lambda step: fixed):
        train(feed(0))  # warm-up (cuDNN autotuning, allocator)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(1, args.train_steps + 1):
            train(feed(step))
        if cuda:
            torch.cuda.synchronize()
        rates.append(args.train_steps * args.train_batch / (time.perf_counter() - start))
    return rates[0], rates[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="training device of the trainer's own path (d, e)")
    parser.add_argument("--train-backbone", default="seresnext50")
    parser.add_argument("--train-width", type=float, default=0.25, help="backbone width of the training comparison")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/glioma-bench-loader"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loader.md")
    args = parser.parse_args(argv)
    config = PreprocessConfig()
    export, store_path = args.work / "export", args.work / "store.zarr"
    if not (export / "clinical.csv").exists():
        generate(export, SyntheticConfig(n=args.n, voxel_size=2.0, seed=0), workers=args.workers)
    convert(export / "images", export / "clinical.csv", store_path, config, workers=args.workers, progress=False)
    store = CohortStore(store_path)
    slots = store.usable()
    n = len(slots)
    folders = [export / "images" / store.patient_ids[i] for i in slots]
    zeros = np.zeros(n)
    rows = []
    anchor = _rate(DataLoader(NiftiEveryEpoch(folders, config), batch_size=4, num_workers=args.workers), n)
    rows.append(("(a) NIfTI.gz + MONAI preprocessing every epoch", anchor))
    zarr_rate = _rate(DataLoader(CohortDataset(store, slots, zeros, zeros), batch_size=4, num_workers=args.workers), n, 2)
    rows.append(("(b) Zarr cohort store (blosc-lz4, chunk per patient)", zarr_rate))
    volumes = store.images(slots)
    memory = _rate(DataLoader(CohortDataset(store, slots, zeros, zeros, volumes=volumes), batch_size=4), n, 3)
    rows.append(("(c) in-memory float16 cache through a DataLoader", memory))
    augmented = _rate(DataLoader(CohortDataset(store, slots, zeros, zeros, volumes=volumes,
                                               transform=training_augmentation(1.0, seed=0)),
                                 batch_size=4, num_workers=args.workers), n, 1)
    rows.append((f"(c') in-memory cache + MONAI CPU augmentation (per item, {args.workers} DataLoader workers)", augmented))
    in_process = _rate(DataLoader(CohortDataset(store, slots, zeros, zeros, volumes=volumes,
                                                transform=training_augmentation(1.0, seed=0)),
                                  batch_size=4, num_workers=0), n, 1)
    rows.append(("(c'') the same in the training process (num_workers 0, as in a trial)", in_process))
    device = torch.device(args.device)
    placements = ["auto", "host"] if device.type == "cuda" else ["auto"]
    for placement in placements:
        cache = VolumeCache(volumes, device, placement)
        where = "uploaded to the GPU once" if cache.on_device else (
            "gathered on the host, pinned copy to the GPU" if device.type == "cuda" else "read in place")
        batches = InMemoryBatches(cache, None)
        rows.append((f"(d) training path, {where}: gather only, float32 batches on {device.type}",
                     _batched_rate(batches, n, device, augment=None, passes=10)))
        rows.append((f"(e) training path, {where}: gather + batched augmentation on {device.type}",
                     _batched_rate(batches, n, device, augment=BatchAugmentation(1.0))))
        if placement == "auto":
            fed, unfed = _training_rates(cache, args)
        del cache, batches
    lines = ["# Loader throughput: volumes/s into batches of 4 at 4 x 120 x 120 x 78", "",
             describe(), f"- {n} synthetic patients (2 mm source voxels), DataLoader workers {args.workers}", "",
             "| pipeline | volumes/s | x (a) |", "|---|---:|---:|"]
    lines += [f"| {name} | {rate:.1f} | {rate / anchor:.1f} |" for name, rate in rows]
    training = (f"{args.train_backbone} at width {args.train_width}, batch {args.train_batch}, "
                f"{'bf16 autocast, channels-last' if device.type == 'cuda' else 'fp32'} on {device.type}")
    lines += ["", f"Training {training}: {fed:.1f} volumes/s with every batch gathered and augmented by the "
              f"training path (placement auto), {unfed:.1f} volumes/s on one batch made once (no loader): "
              f"the device computes **{fed / unfed:.0%} of training time** and waits for the loader in the rest.",
              "", f"Command: `{' '.join(['python -m benchmarks.loader', *(sys.argv[1:] if argv is None else argv)])}`", ""]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
