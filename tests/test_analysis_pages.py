"""Pages and files made from text an export controls: a patient id is never markup, a script or a
path (issue: a Grad-CAM file name carried `x' onerror='alert(1)' y` into an <img> attribute)."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from analysis.sections import img_tag
from datasets.file_names import safe_name

HOSTILE = ["x' onerror='alert(1)' y", '"><script>alert(1)</script>', "../../etc/passwd", "a/b\\c", ".hidden",
           "=HYPERLINK(\"http://x\")", "Ünïcödé 名前", "x" * 300, "", "\x00\n"]


class Attributes(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))


@pytest.mark.parametrize("text", HOSTILE)
def test_an_image_tag_keeps_any_name_inside_its_attribute(text):
    parser = Attributes()
    parser.feed(img_tag(f"gradcam_cell_{text}.png", 480, f"title {text}"))
    ((tag, attrs),) = parser.found
    assert tag == "img" and set(attrs) == {"src", "width", "title"}, attrs
    assert attrs["src"] == f"gradcam_cell_{text}.png" and attrs["title"] == f"title {text}"


@pytest.mark.parametrize("text", HOSTILE)
def test_a_file_name_made_from_an_id_is_one_safe_name(text):
    name = safe_name(text)
    assert name and len(name) <= 89 and not name.startswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name), name
    assert "/" not in name and "\\" not in name and ".." != name


def test_safe_names_keep_plain_ids_and_never_merge_two_ids():
    assert safe_name("SYN-0001") == "SYN-0001" and safe_name("PSN-0123abcd") == "PSN-0123abcd"
    assert safe_name("a/b") != safe_name("a_b") and safe_name("a b") != safe_name("a_b")


def test_the_report_shows_the_parameters_a_space_file_searched(tmp_path):
    """A study whose space came from a YAML file: the report read six built-in parameter names
    instead of the file's; it reads the recorded file, and where that is gone, what varied."""
    from analysis.sections import searched_parameters
    from analysis.study_reader import Study, Trial

    space = tmp_path / "mine.yaml"
    space.write_text("name: mine\nsummary: two parameters\n"
                     "distributions: {lr: {loguniform: [0.0001, 0.01]}, label_smoothing: {uniform: [0, 0.2]}}\n"
                     "reference: {lr: 0.001, label_smoothing: 0.0}\n"
                     "protocols:\n  demo: &p {folds: 2, epochs: 2, num_samples: 2, grace_epochs: 1}\n  full: *p\n")
    trials = [Trial(str(i), "seresnext50", "os_all", str(i), "FINISHED",
                    {"lr": str(lr), "label_smoothing": "0.1", "backbone": "seresnext50", "task": "os_all",
                     "epochs": "2"}, {}) for i, lr in enumerate((1e-3, 3e-3))]
    study = Study("s", "sqlite://", "p", {"space": "mine", "space_file": str(space), "budget": "demo"}, trials)
    assert searched_parameters(study) == ["lr", "label_smoothing"]
    space.unlink()  # the report made on another machine: what varied between the trials
    assert searched_parameters(study) == ["lr"]
