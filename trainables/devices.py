"""Can this process train on the GPUs Ray gave it? (No silent CPU training on a GPU node.)

Ray schedules a trial that asks for GPUs on any node whose resources say it has them, and sets
``CUDA_VISIBLE_DEVICES`` to the ones it assigned; it never checks that the driver, the CUDA build
of torch and the devices work. A node whose driver is missing, whose torch is the CPU build, or
whose GPU is newer than the CUDA build's kernels would then train on the CPU ("auto" device) at a
hundredth of the speed while its trials are reported as finished. `gpu_problem` says why the
assigned GPUs cannot be used, or None; the trainable fails the trial at once with it, and the
study's driver probes one node of each GPU node type with it before the first trial
(`study.preflight.probe_gpu_nodes`).
"""

from __future__ import annotations

import os


def _supported(arch_list: list[str], major: int, minor: int) -> bool:
    """Whether a torch build for `arch_list` (``sm_80``, ``compute_90``...) runs on a device of
    compute capability major.minor: a binary for the same major version and a minor version up to
    the device's, or PTX of a capability up to the device's (compiled by the driver)."""
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.isdigit():
            continue
        built = (int(number[:-1]), int(number[-1]))
        if kind == "sm" and built[0] == major and built[1] <= minor:
            return True
        if kind == "compute" and built <= (major, minor):
            return True
    return False


def gpu_problem(expected: int) -> str | None:
    """Why this process cannot train on `expected` CUDA devices (as Ray assigned them), or None."""
    import torch

    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): install the CUDA build of "
                "torch on this node")
    if not torch.cuda.is_available():
        try:
            torch.cuda.init()
        except Exception as exc:  # the driver's own reason (no driver, driver too old for this CUDA)
            return f"CUDA cannot start: {str(exc).strip().splitlines()[0][:300]}"
        return "torch.cuda.is_available() is False (no NVIDIA driver, or no device visible)"
    count = torch.cuda.device_count()
    if count < expected:
        return (f"{count} CUDA device(s) visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) "
                f"but {expected} assigned")
    arch = torch.cuda.get_arch_list()
    for index in range(expected):
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        if not _supported(arch, major, minor):
            return (f"cuda:{index} ({name}, compute capability {major}.{minor}) is not supported by torch "
                    f"{torch.__version__} with CUDA {torch.version.cuda} (built for {' '.join(arch)})")
        try:
            x = torch.ones(64, 64, device=f"cuda:{index}")
            float((x @ x).sum())
        except Exception as exc:
            return f"cuda:{index} ({name}): a CUDA operation failed: {str(exc).strip().splitlines()[0][:300]}"
    return None


def expected_devices(gpus_per_trial: float) -> int:
    """CUDA devices a trial must see: its whole GPUs, or one it shares (a fraction)."""
    return max(1, int(gpus_per_trial)) if gpus_per_trial > 0 else 0


def node_problem(gpus: float) -> tuple[str, str | None]:
    """(this node's address, `gpu_problem`) for a Ray task or actor that was given `gpus` GPUs."""
    import ray

    address = ray.util.get_node_ip_address()
    return f"{address} ({ray.get_runtime_context().get_node_id()[:12]})", gpu_problem(expected_devices(gpus))
