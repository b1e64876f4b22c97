"""How busy a trial keeps its hardware: CPU and resident memory of its process, and, where NVML is
present (``nvidia-ml-py``, in the project image), the utilisation and memory of its GPUs.

A daemon thread samples memory (and GPU utilisation) every `interval_s` seconds and the trainable
takes the summary of the samples since its last report once per epoch (`ResourceSampler.take`):
the training loop never waits on it (one sample costs about a millisecond of another thread's
time). The CPU use is the process's CPU time over the epoch's wall time, read at each `take`: a
percentage sampled by two threads from one counter read 0 when they sampled a moment apart. The GPUs are the
ones Ray gave the trial (``CUDA_VISIBLE_DEVICES``); the GPU memory is what this process holds
(``torch.cuda.max_memory_reserved``), so trials sharing a GPU are told apart.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

from evaluation import metric_names as names


def _nvml_handles() -> list:
    """NVML handles of the trial's visible GPUs (indices or UUIDs in CUDA_VISIBLE_DEVICES), [] without
    NVML or GPUs; never raises (resource sampling must not fail a trial)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        handles = []
        for device in (v.strip() for v in visible.split(",") if v.strip()):
            handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(device)) if device.isdigit()
                           else pynvml.nvmlDeviceGetHandleByUUID(device))
        return handles
    except Exception:
        return []


class ResourceSampler:
    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._since = (self._cpu_seconds(), time.monotonic())  # where the current epoch's CPU use starts
        self._gpus = _nvml_handles()
        self._lock = threading.Lock()
        self._samples: list[tuple[float, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._thread.start()

    def _cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def _sample(self) -> tuple[float, float | None]:
        rss = self._process.memory_info().rss / 2**30
        util = None
        if self._gpus:
            import pynvml

            try:
                util = sum(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._gpus) / len(self._gpus)
            except Exception:
                util = None
        return rss, util

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample = self._sample()
            with self._lock:
                self._samples.append(sample)

    def take(self) -> dict[str, float]:
        """The summary since the last call: CPU use over it, and the samples' largest memory and mean
        GPU utilisation (with one fresh sample, so that an epoch shorter than the interval has one)."""
        with self._lock:
            samples, self._samples = self._samples, []
        samples.append(self._sample())
        cpu, now = self._cpu_seconds(), time.monotonic()
        (cpu_then, then), self._since = self._since, (cpu, now)
        out = {names.CPU_PERCENT.name: 100.0 * (cpu - cpu_then) / max(now - then, 1e-9),
               names.RSS_GIB.name: max(s[0] for s in samples)}
        utils = [s[1] for s in samples if s[1] is not None]
        if utils:
            out[names.GPU_UTIL.name] = sum(utils) / len(utils)
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                out[names.GPU_MEMORY_GIB.name] = max(torch.cuda.max_memory_reserved(d)
                                                     for d in range(torch.cuda.device_count())) / 2**30
        except Exception:
            pass
        return out

    def stop(self) -> None:
        self._stop.set()
