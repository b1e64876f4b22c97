"""Checks before a study starts: can a node of the cluster ever run a trial, how many trials fit at
once, and will the checkpoints fit on the storage path?

Trials that no node can hold would wait forever (Ray keeps a request no node satisfies pending,
in case an autoscaler adds one). `node_shapes` lists the nodes the study could get: the alive
ones and, when the cluster's autoscaler published its node groups (KubeRay, the autoscaler v2),
each group that may still add nodes; `check_trial_fits` refuses a study whose per-trial request
fits none of them, naming the request and the largest node. On a cluster whose autoscaler did
not publish its groups the check can only warn.

A finished trial keeps its K fold models (one copy of the weights each); a running trial keeps
its last checkpoint (Tune's ``num_to_keep=1``): per fold the network, its optimiser state and,
with a selection split, the selected epoch's weights; a trial ASHA stopped keeps nothing. A
full-size study (240 trials x 10 folds of 3D ResNets) keeps a few hundred gigabytes; finding
that out when the disk fills on day three loses the running trials' last epochs, so it is
checked first.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from datasets.errors import StudyError
from datasets.remote import is_remote

# A running trial: weights + AdamW's two moments + the selected epoch's weights, float32.
RUNNING_COPIES_PER_FOLD = 4
HEADROOM = 1.2


def parameter_count(backbone: str, in_channels: int, out_features: int, width: float, depth: float) -> int:
    """Parameters of a backbone, counted without allocating them (meta device)."""
    import torch

    from trainables.backbones import build_backbone

    with torch.device("meta"):
        model = build_backbone(backbone, in_channels, out_features, width, depth, 0.0)
    return sum(p.numel() for p in model.parameters())


def checkpoint_bytes(config, in_channels: int) -> int:
    """Storage the study's kept checkpoints need: every trial's fold models, plus the full state of
    as many running trials as run at once (of the largest backbone)."""
    protocol = config.protocol
    per_backbone = {b: parameter_count(b, in_channels, 19, protocol.width, protocol.depth) for b in config.backbones}
    finished = sum(per_backbone[cell.backbone] * 4 * protocol.folds * config.samples(cell) for cell in config.cells())
    running = (max(per_backbone.values()) * 4 * RUNNING_COPIES_PER_FOLD * protocol.folds
               * (config.max_concurrent or config.trials))
    return int(finished + running)


def check_free_space(config, in_channels: int) -> int:
    """Raise StudyError if a local storage path lacks room for the checkpoints; returns the estimate."""
    needed = checkpoint_bytes(config, in_channels)
    if is_remote(config.storage_path):
        return needed
    root = Path(config.storage_path)
    while not root.exists():
        root = root.parent
    if not root.is_dir() or not os.access(root, os.W_OK | os.X_OK):
        # A read-only file system reports 0 bytes free: say what is wrong, not "need 0.1 GiB, 0.0 free".
        raise StudyError(f"--storage-path {config.storage_path}: {root} is not writable: "
                         "not a folder, a read-only file system, or no write permission")
    free = shutil.disk_usage(root).free
    if free < needed * HEADROOM:
        raise StudyError(f"--storage-path {config.storage_path}: the study's checkpoints need about "
                         f"{needed / 2**30:.1f} GiB ({needed * HEADROOM / 2**30:.1f} GiB with headroom) and "
                         f"{free / 2**30:.1f} GiB are free; free space, use fewer --num-samples, or store to "
                         "object storage (s3:// gs://)")
    return needed


@dataclass(frozen=True)
class NodeShape:
    """The resources of one node the study has or could get (`count` of them; -1: no limit)."""

    cpus: float
    gpus: float
    count: int = 1
    pending: bool = False  # an autoscaler group, not a running node

    def trials(self, cpus_per_trial: float, gpus_per_trial: float) -> int:
        """How many trials one such node holds at once."""
        slots = math.floor(self.cpus / cpus_per_trial + 1e-9) if cpus_per_trial else math.inf
        if gpus_per_trial:
            slots = min(slots, math.floor(self.gpus / gpus_per_trial + 1e-9))  # 1.0 // 0.2 is 4.0 in floats
        return int(slots) if math.isfinite(slots) else 0

    def __str__(self) -> str:
        return f"{self.cpus:g} CPU and {self.gpus:g} GPU"


def node_shapes() -> tuple[list[NodeShape], bool]:
    """The alive nodes of the connected Ray cluster, plus its autoscaler's groups when it published
    them; second: whether it did."""
    import ray

    shapes = [NodeShape(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
              for n in ray.nodes() if n.get("Alive")]
    try:  # the autoscaler's node groups (a private Ray API: absent or changed means unknown)
        from ray._private.state import state

        cluster = state.get_cluster_config()
        groups = list(cluster.node_group_configs) if cluster is not None else []
    except Exception:
        groups = []
    for group in groups:
        if group.max_count != 0:
            shapes.append(NodeShape(float(group.resources.get("CPU", 0)), float(group.resources.get("GPU", 0)),
                                    int(group.max_count), pending=True))
    return shapes, bool(groups)


def describe_cluster(shapes: list[NodeShape]) -> str:
    alive = [s for s in shapes if not s.pending]
    line = (f"Ray: {len(alive)} node(s) with {sum(s.cpus for s in alive):g} CPU and {sum(s.gpus for s in alive):g} GPU "
            f"in all (largest: {max(alive, key=lambda s: (s.gpus, s.cpus))})")
    groups = [s for s in shapes if s.pending]
    if groups:
        line += "; the autoscaler may add " + ", ".join(
            f"{'any number' if s.count < 0 else f'up to {s.count}'} x ({s})" for s in groups)
    return line


def check_trial_fits(config, shapes: list[NodeShape], autoscaler_known: bool, local: bool) -> None:
    """Raise StudyError (exit 2) if no node the study has or could get can run one trial."""
    need_cpu, need_gpu = config.cpus_per_trial, config.gpus_per_trial
    if any(s.cpus >= need_cpu and s.gpus >= need_gpu for s in shapes):
        return
    largest = max(shapes, key=lambda s: (s.gpus, s.cpus))
    message = (f"each trial asks for {need_cpu:g} CPU and {need_gpu:g} GPU (--cpus-per-trial, --gpus-per-trial), "
               f"but no node {'of this machine ' if local else ''}can give it: the largest has {largest}")
    if local or autoscaler_known:
        raise StudyError(message + "; lower the request, or run on a cluster with such nodes (--address)")
    print(f"  warning: {message} now; the trials wait until the cluster's autoscaler adds such a node", flush=True)


def trial_slots(config, shapes: list[NodeShape]) -> int:
    """Trials that can run at once on every node the study has or could get (the default of
    --max-concurrent), at most the study's trial count."""
    total = config.trials
    slots = 0
    for shape in shapes:
        per_node = shape.trials(config.cpus_per_trial, config.gpus_per_trial)
        if shape.count < 0 and per_node:
            return total
        slots += per_node * shape.count
    return max(1, min(total, slots))


PROBE_TIMEOUT_S = 45.0


def node_type(node: dict) -> str:
    """A node's type as its cluster names it (the autoscaler's group label), else its resources."""
    labels = node.get("Labels") or {}
    for label in ("ray.io/node-group", "ray.io/node-type", "ray.io/group"):
        if labels.get(label):
            return labels[label]
    resources = node["Resources"]
    accelerator = next((k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), None)
    return (f"{resources.get('GPU', 0):g} GPU{f' ({accelerator})' if accelerator else ''}, "
            f"{resources.get('CPU', 0):g} CPU")


def probe_gpu_nodes(config) -> None:
    """Before the first trial, a short Ray task on one node of each GPU node type (asking for a
    trial's GPUs) checks that it can train there (`trainables.devices.gpu_problem`); raise
    StudyError (exit 2) naming the node type and the reason if it cannot, unless the user allows
    CPU training (--cpu-fallback). Nodes the autoscaler adds later are checked by their trials."""
    if config.gpus_per_trial <= 0:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from trainables.devices import node_problem

    chosen: dict[str, dict] = {}
    for node in ray.nodes():
        if node.get("Alive") and node["Resources"].get("GPU", 0) >= config.gpus_per_trial:
            chosen.setdefault(node_type(node), node)
    if not chosen:
        return
    probe = ray.remote(node_problem)
    pending = {kind: probe.options(num_cpus=0, num_gpus=config.gpus_per_trial, max_retries=0,
                                   scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                                   ).remote(config.gpus_per_trial)
               for kind, node in chosen.items()}
    ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
    problems = []
    for kind, ref in pending.items():
        if ref not in ready:
            ray.cancel(ref, force=True)
            print(f"  warning: GPU node type {kind!r} could not be probed within {PROBE_TIMEOUT_S:.0f} s (its GPUs "
                  "busy?): its trials check their GPUs themselves", flush=True)
            continue
        try:
            where, problem = ray.get(ref)
        except Exception as exc:  # the probe could not run there (an import error, a lost node)
            where, problem = chosen[kind]["NodeManagerAddress"], f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        if problem:
            problems.append(f"GPU node type {kind!r} (node {where}) cannot train: {problem}")
        else:
            print(f"  GPU node type {kind!r}: CUDA works (probed on node {where})", flush=True)
    if problems and config.cpu_fallback:
        print("  warning: " + "; ".join(problems) + "; its trials train on the CPU (--cpu-fallback)", flush=True)
    elif problems:
        raise StudyError("; ".join(problems) + ". Its trials would train on the CPU at a fraction of the speed. Fix the "
                         "node's NVIDIA driver or install torch's CUDA build there, or pass --cpu-fallback to train on "
                         "CPUs anyway")


# The object store also holds Tune's and Ray's own objects, and Ray spills to disk near its limit.
OBJECT_STORE_HEADROOM = 1.25


def check_object_stores(config, volume_bytes: int, patients: int, shared: bool) -> None:
    """With shared volumes the driver puts one copy of the cohort in its node's object store and
    every node that runs trials maps a copy of its own: refuse (StudyError, exit 2) a cohort that
    does not fit a node's object store, with the numbers, instead of Ray spilling it to disk or
    failing trials hours later. Nodes the autoscaler adds later are not known yet."""
    if not shared:
        return
    import ray

    own = ray.get_runtime_context().get_node_id()
    short = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        runs_trials = NodeShape(node["Resources"].get("CPU", 0.0), node["Resources"].get("GPU", 0.0)).trials(
            config.cpus_per_trial, config.gpus_per_trial) > 0
        capacity = node["Resources"].get("object_store_memory", 0.0)
        if (runs_trials or node["NodeID"] == own) and capacity < volume_bytes * OBJECT_STORE_HEADROOM:
            short.append(f"{node['NodeManagerAddress']} {capacity / 2**30:.1f} GiB")
    if short:
        raise StudyError(
            f"the cohort's volumes take {volume_bytes / 2**30:.2f} GiB ({patients} patients, float16) and every node "
            f"that runs trials (and the driver's) keeps one copy in Ray's object store, which needs "
            f"{volume_bytes * OBJECT_STORE_HEADROOM / 2**30:.2f} GiB with headroom; too small on: {', '.join(short)}. "
            "Give Ray more object store memory on those nodes (ray start --object-store-memory, a larger /dev/shm), "
            "or pass --no-share-volumes (each trial then reads its own copy from the store)")
