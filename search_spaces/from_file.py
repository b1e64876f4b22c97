"""Search spaces from a user's YAML or JSON file (``--space my_space.yaml``).

The file mirrors `SearchSpace`::

    name: narrow_lr
    summary: lr around the reference recipe, batch 32/64
    backbones: [seresnext50, densenet121]      # optional (default: all three)
    tasks: [os_all, os_gbm]                     # optional (default: all four)
    distributions:
      lr: {loguniform: [3.0e-5, 3.0e-4]}
      weight_decay: {loguniform: [1.0e-7, 1.0e-5]}
      batch_size: {choice: [32, 64]}
      dropout: {uniform: [0.0, 0.3]}
    reference: {lr: 1.0e-4, weight_decay: 1.0e-6, batch_size: 64, dropout: 0.0}
    protocols:                                  # both budgets; keys of `Protocol`
      full: {folds: 10, epochs: 200, num_samples: 20, grace_epochs: 20}
      demo: {folds: 3, epochs: 4, num_samples: 1, grace_epochs: 1, width: 0.25, depth: 0.2,
             cell_samples: {densenet121/os_all: 4}}  # optional: one cell searched deeper

Numbers in exponent form need a decimal point (``1.0e-4``, not ``1e-4``, which YAML reads as text).

YAML is read with ``safe_load`` (no object construction), from a file of at most 64 KiB whose
values, once aliases (``*name``) are expanded, number at most 10,000: a few lines of nested
aliases expand to gigabytes in memory (the "billion laughs"), while ``demo: &p {...}`` /
``full: *p`` stays allowed. Every problem raises `SearchSpaceError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from search_spaces._space import Choice, LogUniform, Protocol, SearchSpace, SearchSpaceError, Uniform

SPACE_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_DISTRIBUTIONS = {"loguniform": LogUniform, "uniform": Uniform, "choice": Choice}
MAX_SPACE_FILE_BYTES = 64 * 1024
MAX_EXPANDED_NODES = 10_000
_TOP_KEYS = {"name", "summary", "backbones", "tasks", "distributions", "reference", "protocols"}


def is_space_file(value: str) -> bool:
    return value.lower().endswith(SPACE_FILE_SUFFIXES)


def _distribution(path: Path, key: str, spec: Any):
    where = f"{path}: distributions.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
        raise SearchSpaceError(f"{where} must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}} or "
                               f"{{choice: [values...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise SearchSpaceError(f"{where}: {kind} needs a list, got {args!r}")
    if kind != "choice" and (len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                                       for a in args)):
        raise SearchSpaceError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
    try:
        return Choice(tuple(args)) if kind == "choice" else _DISTRIBUTIONS[kind](float(args[0]), float(args[1]))
    except ValueError as exc:
        raise SearchSpaceError(f"{where}: {exc}") from exc


def _protocol(path: Path, budget: str, spec: Any) -> Protocol:
    where = f"{path}: protocols.{budget}"
    if not isinstance(spec, dict):
        raise SearchSpaceError(f"{where} must be a mapping of Protocol fields, got {spec!r}")
    known = {f.name for f in dataclasses.fields(Protocol)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise SearchSpaceError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    spec = dict(spec)
    if "distributions" in spec:
        if not isinstance(spec["distributions"], dict):
            raise SearchSpaceError(f"{where}.distributions must be a mapping")
        spec["distributions"] = {k: _distribution(path, f"{budget}.{k}", v) for k, v in spec["distributions"].items()}
    for key in ("folds", "epochs", "num_samples", "grace_epochs", "reduction_factor", "checkpoint_every"):
        if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < 1):
            raise SearchSpaceError(f"{where}.{key} must be a positive whole number, got {spec[key]!r}")
    missing = sorted({"folds", "epochs", "num_samples", "grace_epochs"} - set(spec))
    if missing:
        raise SearchSpaceError(f"{where}: missing {missing}")
    try:
        return Protocol(**spec)
    except (TypeError, ValueError) as exc:
        raise SearchSpaceError(f"{where}: {exc}") from exc


def _safe_yaml(path: Path, text: str) -> Any:
    """`yaml.safe_load`, refusing a document whose aliases expand past `MAX_EXPANDED_NODES` values
    (counted on the composed graph, where an alias is a shared node, before anything is built)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    sizes: dict[int, int] = {}

    def expanded(node) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = 0  # a recursive alias counts once more on the way back up
            children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                        else node.value if isinstance(node, yaml.SequenceNode) else [])
            sizes[id(node)] = 1 + sum(expanded(c) for c in children)
            if sizes[id(node)] > MAX_EXPANDED_NODES:
                raise SearchSpaceError(f"{path}: line {node.start_mark.line + 1}: the aliases expand to more than "
                                       f"{MAX_EXPANDED_NODES} values; a search-space file has no need of so many")
        return sizes[id(node)]

    if root is not None:
        expanded(root)
    return yaml.safe_load(text)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file (its names of training parameters, backbones and
    heads are checked against the trainables by `study.config.check_space`)."""
    path = Path(path).expanduser()
    try:
        found = path.is_file()
    except OSError as exc:  # a name too long for the file system, say
        raise SearchSpaceError(f"--space {str(path)[:80]}...: not a usable path ({exc.strerror})") from None
    if not found:
        raise SearchSpaceError(f"--space {path}: no such search-space file")
    size = path.stat().st_size
    if size > MAX_SPACE_FILE_BYTES:
        raise SearchSpaceError(f"{path}: {size} bytes; a search-space file is at most {MAX_SPACE_FILE_BYTES} bytes")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else _safe_yaml(path, text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise SearchSpaceError(f"{path}: not readable as {path.suffix.lstrip('.').upper()} "
                               f"({(str(exc).splitlines() or [type(exc).__name__])[0]})") from exc
    if not isinstance(data, dict):
        raise SearchSpaceError(f"{path}: expected a mapping with keys {sorted(_TOP_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    missing = sorted({"name", "distributions", "reference", "protocols"} - set(data))
    if unknown or missing:
        raise SearchSpaceError(f"{path}: " + "; ".join(
            ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else [])))
    name = data["name"]
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise SearchSpaceError(f"{path}: name must be letters, digits, '-' and '_', got {name!r}")
    if not isinstance(data["distributions"], dict) or not data["distributions"]:
        raise SearchSpaceError(f"{path}: distributions must be a non-empty mapping")
    if not isinstance(data["reference"], dict):
        raise SearchSpaceError(f"{path}: reference must be a mapping")
    if not isinstance(data["protocols"], dict) or set(data["protocols"]) != {"demo", "full"}:
        raise SearchSpaceError(f"{path}: protocols must have exactly the budgets 'demo' and 'full'")
    distributions = {k: _distribution(path, k, v) for k, v in data["distributions"].items()}
    protocols = {b: _protocol(path, b, data["protocols"][b]) for b in ("demo", "full")}
    lists = {}
    for key in ("backbones", "tasks"):
        if key in data:
            if not isinstance(data[key], list) or not data[key]:
                raise SearchSpaceError(f"{path}: {key} must be a non-empty list")
            lists[key] = tuple(data[key])
    try:
        return SearchSpace(name=name, summary=str(data.get("summary", f"from {path.name}")),
                           distributions=distributions, reference=dict(data["reference"]), protocols=protocols,
                           **lists)
    except ValueError as exc:
        raise SearchSpaceError(f"{path}: {exc}") from exc
