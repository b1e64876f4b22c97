"""Volumes per second into batches: NIfTI.gz + preprocessing every epoch vs the Zarr cohort store
vs the in-memory cache, measured side by side on the same patients.

    python -m benchmarks.loader [--n 24] [--workers 2] [--out benchmarks/results/loader.md]

Builds (once, under --work) a synthetic export of --n patients and its cohort store at the
reference shape 120 x 120 x 78, then times one pass over the patients per pipeline.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks._machine import describe
from datasets import CohortStore
from datasets.convert import convert
from datasets.preprocess import PreprocessConfig, preprocess_patient
from datasets.sequences import SequenceMatcher
from datasets.synthetic import SyntheticConfig, generate
from datasets.torch_data import CohortDataset, training_augmentation
from trainables.batches import BatchAugmentation, InMemoryBatches


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="device of the batched augmentation (d)")
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
    rows.append(("(c) in-memory float16 cache", memory))
    augmented = _rate(DataLoader(CohortDataset(store, slots, zeros, zeros, volumes=volumes,
                                               transform=training_augmentation(1.0, seed=0)),
                                 batch_size=4, num_workers=args.workers), n, 1)
    rows.append((f"(c') in-memory cache + MONAI CPU augmentation (per item, {args.workers} DataLoader workers)", augmented))
    in_process = _rate(DataLoader(CohortDataset(store, slots, zeros, zeros, volumes=volumes,
                                                transform=training_augmentation(1.0, seed=0)),
                                  batch_size=4, num_workers=0), n, 1)
    rows.append(("(c'') the same in the training process (num_workers 0, as in a trial)", in_process))
    device = torch.device(args.device)
    batches = InMemoryBatches(volumes, None, device)
    augment = BatchAugmentation(1.0)
    generator = torch.Generator(device=device).manual_seed(0)
    start, seen = time.perf_counter(), 0
    for _ in range(3):
        for order in InMemoryBatches.order(n, 4, torch.Generator().manual_seed(0), drop_last=False):
            augment(batches.images(order), generator)
            seen += len(order)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows.append((f"(d) in-memory cache + batched augmentation on {device.type} (the training path)",
                 seen / (time.perf_counter() - start)))
    lines = ["# Loader throughput: volumes/s into batches of 4 at 4 x 120 x 120 x 78", "",
             describe(), f"- {n} synthetic patients (2 mm source voxels), DataLoader workers {args.workers}", "",
             "| pipeline | volumes/s | x (a) |", "|---|---:|---:|"]
    lines += [f"| {name} | {rate:.1f} | {rate / anchor:.1f} |" for name, rate in rows]
    lines += ["", "Command: `python -m benchmarks.loader`", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
