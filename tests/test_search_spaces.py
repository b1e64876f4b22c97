"""Every registered search space is valid, samples inside its ranges, and converts to Tune."""

from __future__ import annotations

import numpy as np
import pytest

from search_spaces import SPACES, TASKS, Choice, LogUniform, Protocol, SearchSpace, SearchSpaceError, get_space
from trainables.config import TrainConfig


@pytest.mark.parametrize("name", sorted(SPACES))
def test_space_samples_valid_training_configs(name):
    space = SPACES[name]
    rng = np.random.default_rng(0)
    for _ in range(200):
        budget = ("demo", "full")[_ % 2]
        sample = space.sample(rng, budget)
        assert set(sample) == set(space.distributions_for(budget))
        for key, value in sample.items():
            assert space.distributions_for(budget)[key].contains(value)
        for budget, protocol in space.protocols.items():
            TrainConfig.from_dict({**sample, **protocol.fixed, "epochs": protocol.epochs, "width": protocol.width,
                                   "depth": protocol.depth})
    assert all(t in TASKS for t in space.tasks)


def test_literature_priors_is_centred_on_the_reference_recipe():
    space = get_space("literature_priors")
    assert space.reference["lr"] == 1e-4 and space.reference["weight_decay"] == 1e-6
    assert space.reference["batch_size"] == 64
    full = space.protocols["full"]
    assert (full.folds, full.epochs) == (10, 200)
    assert "Loshchilov" in __import__("search_spaces.literature_priors").literature_priors.__doc__


def test_tune_domains():
    from ray import tune

    from study.tuning import tune_domain

    assert isinstance(tune_domain(LogUniform(1e-5, 1e-3)), tune.search.sample.Float)
    assert tune_domain(Choice((16, 32))).categories == [16, 32]


@pytest.mark.parametrize("make, message", [
    (lambda: LogUniform(0, 1), "0 < low < high"),
    (lambda: Protocol(folds=1, epochs=2, num_samples=1, grace_epochs=1), "folds must be at least 2"),
    (lambda: Protocol(folds=2, epochs=2, num_samples=1, grace_epochs=3), "grace_epochs"),
    (lambda: SearchSpace("x", "", {"lr": LogUniform(1e-5, 1e-3)}, {"lr": 1.0},
                         {"demo": Protocol(2, 2, 1, 1), "full": Protocol(2, 2, 1, 1)}), "outside its distribution"),
])
def test_invalid_spaces_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unknown_space_lists_valid_ones():
    with pytest.raises(KeyError, match="valid spaces are"):
        get_space("nope")


@pytest.mark.parametrize("key", ["backbone", "head", "epochs", "seed", "inputs"])
def test_a_space_file_may_not_fix_what_a_cell_owns(tmp_path, key):
    """A `fixed:` backbone used to overwrite the cell's: a DenseNet-121 trained, logged as SE-ResNeXt50."""
    from search_spaces.from_file import SearchSpaceError, load_space

    value = {"backbone": "densenet121", "head": "cox", "epochs": 3, "seed": 1, "inputs": "image"}[key]
    protocol = "{folds: 2, epochs: 2, num_samples: 1, grace_epochs: 1, fixed: {%s: %s}}" % (key, value)
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndistributions: {lr: {loguniform: [1.0e-4, 1.0e-3]}}\nreference: {lr: 1.0e-4}\n"
                    f"protocols: {{demo: {protocol}, full: {protocol}}}\n")
    with pytest.raises(SearchSpaceError, match=f"{path}.*protocols.demo.*'{key}'"):
        load_space(path)


@pytest.mark.parametrize("distributions, reference, reason", [
    ("{lr: {loguniform: [1.0e-4, 1.0e-3]}, batch_size: {choice: [0, 8]}}", "{lr: 1.0e-4, batch_size: 8}",
     "batch_size=0 cannot train"),
    ("{lr: {loguniform: [1.0e-4, .inf]}}", "{lr: 1.0e-4}", "finite"),
    ("{lr: {loguniform: [1.0e-4, 1.0e-3]}, dropout: {uniform: [0.0, 1.5]}}", "{lr: 1.0e-4, dropout: 0.0}",
     "dropout=1.5 cannot train"),
])
def test_a_space_whose_configurations_cannot_train_is_refused_before_anything_runs(
        tmp_path, small_store, capsys, distributions, reference, reason):
    """Such trials failed on their first line and were retried as lost workers; the study exited 0."""
    from study.run import main

    protocol = "{folds: 2, epochs: 2, num_samples: 1, grace_epochs: 1}"
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: bad\ndistributions: {distributions}\nreference: {reference}\n"
                    f"protocols: {{demo: {protocol}, full: {protocol}}}\n")
    code = main(["--space", str(path), "--data", str(small_store), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                 "--storage-path", str(tmp_path / "rr")])
    err = capsys.readouterr().err
    assert code == 2 and reason in err and "bad.yaml" in err, err
    assert not (tmp_path / "rr").exists() and not (tmp_path / "m.db").exists()


def test_asha_needs_a_reduction_factor_of_two_or_more():
    """A factor of 1 passed the space check, hung --dry-run's cost estimate and crashed inside Tune."""
    with pytest.raises(ValueError, match="reduction_factor must be at least 2"):
        Protocol(folds=2, epochs=4, num_samples=1, grace_epochs=1, reduction_factor=1)


def test_ids_with_other_characters_are_scrubbed_as_written():
    from datasets.pseudonyms import spellings

    for pid in ("Müller01", "Pat#001", "ID--7", "GBM 001 (a)"):
        assert spellings(pid).sub("PSN", f"/data/{pid}/{pid}_t1.nii.gz") == "/data/PSN/PSN_t1.nii.gz"


@pytest.mark.parametrize("text, reason", [
    # The "billion laughs": 7 lines, 9**7 strings once expanded.
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdef", "bcdefg")), "aliases expand to more than 10000"),
    ("name: big\nsummary: '" + "x" * 70_000 + "'\n", "at most 65536 bytes"),
    ("[" * 20_000 + "]" * 20_000, "not readable as YAML"),
])
def test_a_space_file_that_expands_or_nests_without_bound_is_refused(tmp_path, text, reason):
    from search_spaces.from_file import SearchSpaceError, load_space

    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(SearchSpaceError, match=f"{path}.*{reason}"):
        load_space(path)


def test_a_space_file_may_share_one_protocol_between_budgets_with_an_alias(tmp_path):
    from search_spaces.from_file import load_space

    path = tmp_path / "shared.yaml"
    path.write_text("name: shared\ndistributions: {lr: {loguniform: [1.0e-4, 1.0e-3]}}\nreference: {lr: 1.0e-4}\n"
                    "protocols:\n  demo: &p {folds: 2, epochs: 2, num_samples: 1, grace_epochs: 1}\n  full: *p\n")
    space = load_space(path)
    assert space.protocols["demo"] == space.protocols["full"]


def test_the_demo_searches_one_cell_deeper_and_num_samples_makes_every_cell_alike(tmp_path):
    """The demo runs the reference recipe alone in most cells and a search in one (`cell_samples`),
    so that it shows a choice among finished configurations in its time budget."""
    from study.config import resolve
    from study.run import build_parser

    def config(*flags):
        return resolve(build_parser().parse_args(["--storage-path", str(tmp_path / "runs"), *flags]))

    demo = config()
    deep = {cell.label: demo.samples(cell) for cell in demo.cells() if demo.samples(cell) > 1}
    assert deep == get_space("literature_priors").protocols["demo"].cell_samples and len(deep) == 1
    assert demo.trials == len(demo.cells()) - 1 + next(iter(deep.values()))
    uniform = config("--num-samples", "3")
    assert {uniform.samples(cell) for cell in uniform.cells()} == {3} and uniform.trials == 3 * len(uniform.cells())
    other = config("--backbones", "resnet50_cbam")  # the searched cell is not in the study: every cell its reference
    assert other.trials == len(other.cells())


@pytest.mark.parametrize("value", [{"densenet121/nope": 3}, {"densenet121": 3}, {"densenet121/os_all": 0},
                                   {"densenet121/os_all": True}, ["densenet121/os_all"]])
def test_cell_samples_must_name_a_cell_and_a_positive_count(value):
    with pytest.raises(SearchSpaceError, match="cell_samples"):
        Protocol(folds=2, epochs=2, num_samples=1, grace_epochs=1, cell_samples=value)


def test_a_space_file_may_search_one_cell_deeper(tmp_path):
    from search_spaces.from_file import load_space

    path = tmp_path / "deep.yaml"
    path.write_text("name: deep\nsummary: one cell deeper\ndistributions: {lr: {loguniform: [1.0e-4, 1.0e-2]}}\n"
                    "reference: {lr: 1.0e-3}\nprotocols:\n  demo: &p {folds: 2, epochs: 2, num_samples: 1, "
                    "grace_epochs: 1, cell_samples: {seresnext50/os_all: 3}}\n  full: *p\n")
    assert load_space(path).protocols["demo"].cell_samples == {"seresnext50/os_all": 3}
    path.write_text(path.read_text().replace("{seresnext50/os_all: 3}", "[seresnext50]"))
    with pytest.raises(SearchSpaceError, match="cell_samples"):
        load_space(path)
