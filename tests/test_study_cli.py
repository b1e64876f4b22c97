"""The study command's usage errors, help, space listing and dry run."""

from __future__ import annotations

import json
import shutil

import pytest

from study.run import build_parser, main


@pytest.fixture
def base(small_store, tmp_path):
    return ["--data", str(small_store), "--space", "smoke", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
            "--storage-path", str(tmp_path / "rr")]


@pytest.mark.parametrize("extra, message", [
    (["--space", "nope"], "--space 'nope' is not a known search space"),
    (["--backbones", "vgg16"], r"--backbones: unknown \['vgg16'\]"),
    (["--tasks", "pfs_all"], r"--tasks: unknown \['pfs_all'\]"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--num-samples", "-3"], "--num-samples must be at least 1"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be at least 1"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial must be"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial must be"),
    (["--name", "bad name!"], "--name 'bad name!'"),
    (["--tasks", "os_all", "os_all"], "repeated values"),
])
def test_bad_flags_exit_2_with_a_message(base, extra, message, capsys, tmp_path):
    assert main(base + extra) == 2
    err = capsys.readouterr().err
    assert message in err or __import__("re").search(message, err), err
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "rr").exists(), "nothing written"


def test_missing_store_and_wrong_version(tmp_path, small_store, capsys):
    assert main(["--data", str(tmp_path / "none.zarr"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err
    copy = tmp_path / "old.zarr"
    shutil.copytree(small_store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 0
    (copy / "zarr.json").write_text(json.dumps(meta))
    assert main(["--data", str(copy), "--dry-run"]) == 2
    assert "format version 0" in capsys.readouterr().err


def test_help_documents_every_option_with_its_default():
    text = build_parser().format_help()
    for option in ("--space", "--data", "--external", "--backbones", "--tasks", "--num-samples", "--max-concurrent",
                   "--gpus-per-trial", "--cpus-per-trial", "--address", "--tracking-uri", "--storage-path", "--name",
                   "--resume", "--budget", "--seed", "--dry-run", "--list-spaces"):
        assert option in text
    assert text.count("default") >= 15


def test_list_spaces(capsys):
    assert main(["--list-spaces"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["literature_priors", "smoke", "wide"]


def test_dry_run_prints_the_resolved_study(base, capsys, tmp_path):
    assert main(base + ["--dry-run", "--tasks", "os_all", "1yr_gbm"]) == 0
    out = capsys.readouterr().out
    assert "3 backbones x 2 tasks x 2 configurations = 12 trials" in out
    assert "task os_all (all, os, cox head): 12 patients" in out
    assert "fold sizes [6, 6]" in out
    assert not (tmp_path / "rr").exists()


def test_unreachable_tracking_server_stops_before_training(small_store, tmp_path, capsys):
    code = main(["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "--tracking-uri",
                 "http://127.0.0.1:9", "--storage-path", str(tmp_path / "rr")])
    assert code == 2
    assert "tracking store http://127.0.0.1:9 cannot be reached" in capsys.readouterr().err
    assert not list((tmp_path / "rr").rglob("*.pkl")), "no Tune experiment was started"


def test_unwritable_storage_path_stops_before_tracking(small_store, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["--space", "smoke", "--data", str(small_store), "--tasks", "os_all", "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db", "--storage-path", str(blocker / "rr")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--storage-path" in err and "not writable" in err
    assert not (tmp_path / "m.db").exists(), "nothing written to MLflow for a rejected study"


def test_resume_of_a_study_that_does_not_exist(base, capsys, tmp_path):
    assert main(base + ["--name", "never-ran", "--resume"]) == 2
    assert "no study 'never-ran'" in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists()
