"""How busy a trial keeps its hardware: CPU and resident memory of its process, and, where NVML is
present (``nvidia-ml-py``, in the project image), the utilisation and memory of its GPUs.

A daemon thread samples every `interval_s` seconds and the trainable takes the summary of the
samples since its last report once per epoch (`ResourceSampler.take`): the training loop never
waits on it (one sample costs about a millisecond of another thread's time). The GPUs are the
ones Ray gave the trial (``CUDA_VISIBLE_DEVICES``); the GPU memory is what this process holds
(``torch.cuda.max_memory_reserved``), so trials sharing a GPU are told apart.
"""

from __future__ import annotations

import os
import threading

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
        self._process.cpu_percent(None)  # the first call only starts the count
        self._gpus = _nvml_handles()
        self._lock = threading.Lock()
        self._samples: list[tuple[float, float, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[float, float, float | None]:
        cpu = self._process.cpu_percent(None)
        rss = self._process.memory_info().rss / 2**30
        util = None
        if self._gpus:
            import pynvml

            try:
                util = sum(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._gpus) / len(self._gpus)
            except Exception:
                util = None
        return cpu, rss, util

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample = self._sample()
            with self._lock:
                self._samples.append(sample)

    def take(self) -> dict[str, float]:
        """The summary of the samples since the last call (one fresh sample if there were none)."""
        with self._lock:
            samples, self._samples = self._samples, []
        if not samples:
            samples = [self._sample()]
        out = {names.CPU_PERCENT.name: sum(s[0] for s in samples) / len(samples),
               names.RSS_GIB.name: max(s[1] for s in samples)}
        utils = [s[2] for s in samples if s[2] is not None]
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
