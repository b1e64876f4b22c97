"""The study command's usage errors, help, space listing and dry run."""

from __future__ import annotations


import pytest

from study.run import build_parser, main


@pytest.fixture
def base(small_store, tmp_path):
    return ["--data", str(small_store), "--space", "smoke", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
            "--storage-path", str(tmp_path / "rr")]


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
    assert "3 backbones x 2 tasks x 1 inputs (image) x 2 configurations = 12 trials" in out
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
