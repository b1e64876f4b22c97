"""Bad input, one table: CLI flags, search-space files, cohort stores, clinical tables, checkpoints.

Every case must end with exit code 2 (usage error) or the project's own exception, a message that
names the flag, file, column or patient and what was expected, and nothing written: no MLflow
database, no Tune storage folder, no store.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from datasets.convert import main as convert_main
from study.run import main as study_main

VALID_SPACE = """
name: user_space
distributions:
  lr: {loguniform: [1.0e-4, 1.0e-2]}
  batch_size: {choice: [4]}
reference: {lr: 1.0e-3, batch_size: 4}
protocols:
  demo: &p {folds: 2, epochs: 1, num_samples: 1, grace_epochs: 1, width: 0.25, depth: 0.2}
  full: *p
"""


@dataclass
class Case:
    """One bad input: `prepare(tmp, store)` returns the command's arguments."""

    name: str
    prepare: Callable[[Path, Path], list[str]]
    message: str
    command: str = "study"  # study | convert


def flags(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, store: ["--data", str(store), "--space", "smoke", *extra]


def space_file(text: str, suffix: str = ".yaml") -> Callable[[Path, Path], list[str]]:
    def prepare(tmp: Path, store: Path) -> list[str]:
        path = tmp / f"space{suffix}"
        path.write_text(text)
        return ["--data", str(store), "--space", str(path)]
    return prepare


def damaged_store(edit: Callable[[Path], None], *extra: str) -> Callable[[Path, Path], list[str]]:
    def prepare(tmp: Path, store: Path) -> list[str]:
        copy = tmp / "copy.zarr"
        shutil.copytree(store, copy)
        edit(copy)
        return ["--data", str(copy), "--space", "smoke", *extra]
    return prepare


def _truncate_chunk(store: Path) -> None:
    chunk = sorted((store / "images" / "c").rglob("*"))[-1]
    while chunk.is_dir():
        chunk = sorted(chunk.iterdir())[0]
    chunk.write_bytes(chunk.read_bytes()[:100])


def _format_version(store: Path) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 0
    (store / "zarr.json").write_text(json.dumps(meta))


def _set_clinical(column: str, value: float) -> Callable[[Path], None]:
    def edit(store: Path) -> None:
        array = zarr.open_array(str(store / "clinical" / column), mode="r+")
        array[:] = np.full(array.shape, value)
    return edit


def _external_other_shape(tmp: Path, store: Path) -> list[str]:
    other = tmp / "other.zarr"
    shutil.copytree(store, other)
    for name in ("zarr.json",):
        meta = json.loads((other / name).read_text())
        meta["attributes"]["sequences"] = ["t1c", "flair"]
        meta["attributes"]["preprocessing"]["sequences"] = ["t1c", "flair"]
        (other / name).write_text(json.dumps(meta))
    return ["--data", str(store), "--space", "smoke", "--external", str(other)]


def clinical(edit: Callable[[Path], None], *extra: str) -> Callable[[Path, Path], list[str]]:
    def prepare(tmp: Path, export: Path) -> list[str]:
        table = tmp / "clinical.csv"
        shutil.copy(export / "clinical.csv", table)
        edit(table)
        return ["--images", str(export / "images"), "--clinical", str(table), "--out", str(tmp / "new.zarr"),
                "--shape", "32x32x24", "--no-progress", *extra]
    return prepare


def _csv_edit(fn: Callable[[str], str]) -> Callable[[Path], None]:
    return lambda path: path.write_text(fn(path.read_text()))


CASES = [
    # -- CLI flags of the study
    Case("unknown space", flags("--space", "nope"), r"--space 'nope' is not a known search space"),
    Case("unknown backbone", flags("--backbones", "vgg16"), r"--backbones: unknown \['vgg16'\]; valid values"),
    Case("unknown task", flags("--tasks", "pfs_all"), r"--tasks: unknown \['pfs_all'\]"),
    Case("repeated task", flags("--tasks", "os_all", "os_all"), r"--tasks: repeated values"),
    Case("zero samples", flags("--num-samples", "0"), r"--num-samples must be at least 1, got 0"),
    Case("negative samples", flags("--num-samples", "-3"), r"--num-samples must be at least 1, got -3"),
    Case("non-numeric samples", flags("--num-samples", "many"), r"--num-samples: invalid int value: 'many'"),
    Case("zero CPUs", flags("--cpus-per-trial", "0"), r"--cpus-per-trial must be at least 1"),
    Case("negative GPUs", flags("--gpus-per-trial", "-1"), r"--gpus-per-trial must be a fraction"),
    Case("fractional multi-GPU", flags("--gpus-per-trial", "1.5"), r"--gpus-per-trial must be a fraction"),
    Case("zero concurrency", flags("--max-concurrent", "0"), r"--max-concurrent must be at least 1, got 0"),
    Case("bad study name", flags("--name", "my study!"), r"--name 'my study!': use letters, digits"),
    Case("unknown budget", flags("--budget", "huge"), r"--budget: invalid choice: 'huge'"),
    Case("infinite GPUs", flags("--gpus-per-trial", "inf"), r"--gpus-per-trial must be a fraction"),
    Case("negative seed", flags("--seed", "-1"), r"--seed must be a whole number in \[0, 2\^31\), got -1"),
    Case("name too long", flags("--name", "n" * 300), r"--name is 300 characters; at most 100"),
    Case("space fixed and searched",
         space_file(VALID_SPACE.replace("width: 0.25", "fixed: {lr: 1.0e-3}, width: 0.25")),
         r"\['lr'\] are both fixed and searched"),
    Case("space non-numeric width", space_file(VALID_SPACE.replace("width: 0.25", "width: wide")),
         r"cannot train"),
    Case("resume of an unknown study", flags("--name", "never_ran", "--resume"), r"no study 'never_ran' .* to resume"),
    # -- search-space files
    Case("space file missing", lambda tmp, store: ["--data", str(store), "--space", str(tmp / "none.yaml")],
         r"--space .*none.yaml: no such search-space file"),
    Case("space YAML syntax", space_file("name: [unclosed\n"), r"space.yaml: not readable as YAML"),
    Case("space JSON syntax", space_file("{'name': 1}", ".json"), r"space.json: not readable as JSON"),
    Case("space not a mapping", space_file("- lr\n- batch_size\n"), r"space.yaml: expected a mapping"),
    Case("space unknown distribution", space_file(VALID_SPACE.replace("loguniform", "lognormal")),
         r"distributions.lr must be one of \{loguniform"),
    Case("space low above high", space_file(VALID_SPACE.replace("[1.0e-4, 1.0e-2]", "[1.0e-2, 1.0e-4]")),
         r"distributions.lr: LogUniform needs finite 0 < low < high"),
    Case("space reference outside", space_file(VALID_SPACE.replace("lr: 1.0e-3", "lr: 0.5")),
         r"reference lr=0.5 is outside its distribution"),
    Case("space unknown parameter", space_file(VALID_SPACE.replace("lr", "learning_rate")),
         r"\['learning_rate'\] are not training parameters"),
    Case("space protocol without folds", space_file(VALID_SPACE.replace("folds: 2, ", "")),
         r"protocols.demo: missing \['folds'\]"),
    Case("space named like a built-in", space_file(VALID_SPACE.replace("user_space", "smoke")),
         r"name 'smoke' is a built-in space"),
    Case("space unknown key", space_file(VALID_SPACE + "sampler: random\n"), r"unknown key\(s\) \['sampler'\]"),
    # -- cohort stores
    Case("store missing", lambda tmp, store: ["--data", str(tmp / "none.zarr")], r"cohort store .*none.zarr does not exist"),
    Case("store not a cohort store", lambda tmp, store: (zarr.open_group(str(tmp / "plain.zarr"), mode="w"),
                                                         ["--data", str(tmp / "plain.zarr")])[1],
         r"plain.zarr is a Zarr store but not a cohort store"),
    Case("store format version", damaged_store(_format_version), r"has format version 0; this software reads version 1"),
    Case("store truncated chunk", damaged_store(_truncate_chunk), r"patient SYN-\d+: cohort store .* 'images' .* cannot be read"),
    Case("no patient after the filter", damaged_store(_set_clinical("glioblastoma", 0.0), "--tasks", "os_gbm"),
         r"no patient left after filter 'glioblastoma'"),
    Case("a fold without events", damaged_store(_set_clinical("event", 0.0), "--tasks", "os_all"),
         r"fold 0 of 2 has no event"),
    Case("external store missing", flags("--external", "/nonexistent/ext.zarr"),
         r"cohort store /nonexistent/ext.zarr does not exist"),
    Case("external channels differ", _external_other_shape,
         r"--external .*other.zarr: sequences \['t1c', 'flair'\] differ from the development store's"),
    # -- clinical tables (the converter)
    Case("clinical column missing", clinical(_csv_edit(lambda t: t.replace("survival_days", "days_alive", 1))),
         r"clinical.csv: required column\(s\) \['time'\] not found; columns are", "convert"),
    Case("clinical duplicate ids", clinical(_csv_edit(lambda t: t + t.splitlines()[1] + "\n")),
         r"duplicate patient_id\(s\) \['SYN-0001'\]", "convert"),
    Case("clinical binary file", clinical(lambda p: p.write_bytes(b"\x00\xff\xfe" * 50)),
         r"clinical.csv: cannot be read as CSV", "convert"),
    Case("clinical bad --column", clinical(lambda p: None, "--column", "survival=os"),
         r"--column 'survival=os': unknown name 'survival'", "convert"),
    Case("convert --out is a file", lambda tmp, export: ["--images", str(export / "images"), "--clinical",
                                                         str(export / "clinical.csv"), "--out",
                                                         str(export / "clinical.csv"), "--no-progress"],
         r"--out .*clinical.csv exists and is not a folder", "convert"),
    Case("convert --out under a file", lambda tmp, export: ["--images", str(export / "images"), "--clinical",
                                                            str(export / "clinical.csv"), "--out",
                                                            str(export / "clinical.csv" / "new.zarr"), "--no-progress"],
         r"--out .*new.zarr: .*clinical.csv is not a writable folder", "convert"),
    Case("convert --sequences repeated", clinical(lambda p: None, "--sequences", "t1", "t1"),
         r"sequences must differ", "convert"),
]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(case, workspace, small_store, small_export, capsys):
    source = small_export if case.command == "convert" else small_store
    argv = case.prepare(workspace, source)
    before = sorted(p.name for p in workspace.iterdir())
    common = ["--tracking-uri", f"sqlite:///{workspace}/m.db", "--storage-path", str(workspace / "rr")]
    try:
        code = study_main(argv + common) if case.command == "study" else convert_main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(case.message, err), err
    assert sorted(p.name for p in workspace.iterdir()) == before, "nothing written"
    assert len(CASES) >= 30


def test_checkpoint_corrupt_or_from_another_backbone_is_refused(small_store, tmp_path):
    from tests.test_trainables_fold import TINY, _fold_data
    from trainables.config import TrainConfig
    from trainables.fold import CheckpointError, FoldTrainer

    path = tmp_path / "fold.pt"
    FoldTrainer(_fold_data(small_store, k=2), TrainConfig(epochs=2, **TINY), path).step()
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} was written for .*seresnext50"):
        FoldTrainer(_fold_data(small_store, k=2), TrainConfig(epochs=2, **{**TINY, "backbone": "densenet121"}), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} cannot be read"):
        FoldTrainer(_fold_data(small_store, k=2), TrainConfig(epochs=2, **TINY), path)


def test_storage_without_room_for_the_checkpoints_is_refused(small_store, workspace, monkeypatch, capsys):
    """A full disk is not something a test can safely make: the free space is reported small."""
    from collections import namedtuple

    import study.preflight

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(study.preflight.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    code = study_main(["--data", str(small_store), "--space", "smoke", "--tracking-uri", f"sqlite:///{workspace}/m.db",
                       "--storage-path", str(workspace / "rr")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"--storage-path .*rr: the study's checkpoints need about .* GiB are free", err), err
    assert sorted(p.name for p in workspace.iterdir()) == [], "nothing written"


def test_full_size_checkpoint_estimate_is_told():
    """The reference study (3 backbones x 4 tasks x 20 configurations x 10 folds) keeps ~1 TB of checkpoints."""
    from study.config import resolve
    from study.preflight import checkpoint_bytes
    from study.run import build_parser

    config = resolve(build_parser().parse_args(["--budget", "full", "--num-samples", "20"]))
    assert 2e11 < checkpoint_bytes(config, 4) < 5e12


def test_report_refuses_a_negative_patient_count_before_reading_anything(tmp_path, capsys):
    from analysis.report import main as report_main

    assert report_main(["--study", "any", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--gradcam-random", "-1",
                        "--out", str(tmp_path / "report")]) == 2
    assert "--gradcam-random must be 0 or more, got -1" in capsys.readouterr().err
    assert not (tmp_path / "report").exists() and not (tmp_path / "m.db").exists()


def test_a_read_only_storage_path_is_named_as_such(small_store, workspace, monkeypatch, capsys):
    """A read-only file system reported "need about 0.0 GiB, 0.0 GiB are free"."""
    import os

    import study.preflight

    real_access = os.access
    read_only = workspace / "ro"
    read_only.mkdir()
    monkeypatch.setattr(study.preflight.os, "access",
                        lambda path, mode: False if Path(path) == read_only else real_access(path, mode))
    code = study_main(["--data", str(small_store), "--space", "smoke", "--tasks", "os_all", "--tracking-uri",
                 f"sqlite:///{workspace}/m.db", "--storage-path", str(read_only / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{read_only} is not writable: not a folder, a read-only file system" in err
    assert not (read_only / "runs").exists()
