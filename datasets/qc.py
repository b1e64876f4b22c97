"""Quality-control report of a cohort store: a three-plane montage per patient and an HTML page.

Montages use the radiological convention: in axial and coronal views the patient's right is on
the viewer's left; the sagittal view has anterior on the left; superior/anterior are at the top.
Each panel carries its orientation letters so a flipped axis is visible at a glance.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

QC_DIR = "qc"
# plane name -> (axis sliced, (left, right, top, bottom) letters)
_PLANES = {
    "axial": (2, ("R", "L", "A", "P")),
    "coronal": (1, ("R", "L", "S", "I")),
    "sagittal": (0, ("A", "P", "S", "I")),
}


def slice_centre(mask: np.ndarray, label: np.ndarray | None = None) -> tuple[int, int, int]:
    """Voxel through which the planes are cut: the tumour centroid, else the mask centroid."""
    source = label if label is not None and label.any() else mask
    if not source.any():
        return tuple(s // 2 for s in mask.shape)
    return tuple(int(round(c)) for c in np.argwhere(source).mean(axis=0))


def plane(volume: np.ndarray, name: str, centre: Sequence[int]) -> np.ndarray:
    """2D display array of one plane (rows top->bottom, columns left->right on screen)."""
    axis = _PLANES[name][0]
    cut = np.take(volume, centre[axis], axis=axis)  # axial: (x, y); coronal: (x, z); sagittal: (y, z)
    # Transposed, the second remaining axis runs down the rows; reversing rows puts anterior
    # (axial) or superior (coronal, sagittal) at the top. Reversing columns puts high x (the
    # patient's right, RAS) on the left for axial/coronal, and anterior on the left for sagittal.
    return cut.T[::-1, ::-1]


def _window(volume: np.ndarray, mask: np.ndarray, missing: bool) -> np.ndarray:
    """Volume scaled to [0, 1] between its 1st and 99th percentile inside the brain mask."""
    low, high = (np.percentile(volume[mask > 0], (1, 99)) if mask.any() and not missing else (0.0, 1.0))
    return np.clip((volume - low) / max(high - low, 1e-6), 0, 1)


def _outline(label_plane: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2D label (inside the label, next to a pixel outside it)."""
    inside = label_plane > 0
    padded = np.pad(inside, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~interior


def montage(path: Path, patient_id: str, image: np.ndarray, sequences: Sequence[str], mask: np.ndarray,
            label: np.ndarray | None, missing: Sequence[bool]) -> None:
    """Write a PNG: one row per sequence, columns axial, coronal, sagittal.

    The panels are tiled into one RGB array drawn on a single axes: a grid of matplotlib axes
    cost about 0.5 s per patient, most of a small store's conversion time.
    """
    centre = slice_centre(mask, label)
    planes = [[plane(_window(image[r].astype(np.float32), mask, missing[r]), name, centre) for name in _PLANES]
              for r in range(len(sequences))]
    outlines = ([_outline(plane(label, name, centre)) for name in _PLANES] if label is not None and label.any()
                else [None] * len(_PLANES))
    cell_h = max(p.shape[0] for row in planes for p in row)
    cell_w = max(p.shape[1] for row in planes for p in row)
    gap = max(1, cell_w // 40)
    tiled = np.zeros((len(sequences) * (cell_h + gap), len(_PLANES) * (cell_w + gap), 3), dtype=np.float32)
    fig = plt.figure(figsize=(7.5, 2.4 * len(sequences) + 0.4))
    ax = fig.add_axes((0.08, 0.0, 0.92, 1 - 0.4 / fig.get_figheight()))
    for r, row in enumerate(planes):
        for c, (name, panel) in enumerate(zip(_PLANES, row)):
            top = r * (cell_h + gap) + (cell_h - panel.shape[0]) // 2
            left = c * (cell_w + gap) + (cell_w - panel.shape[1]) // 2
            cell = tiled[top:top + panel.shape[0], left:left + panel.shape[1]]
            cell[:] = panel[..., None]
            if outlines[c] is not None:
                cell[outlines[c]] = (1.0, 0.1, 0.1)
            letters = _PLANES[name][1]
            bottom, right = top + panel.shape[0] - 1, left + panel.shape[1] - 1
            middle_y, middle_x = (top + bottom) / 2, (left + right) / 2
            for text, x, y, ha, va in ((letters[0], left + 1, middle_y, "left", "center"),
                                       (letters[1], right - 1, middle_y, "right", "center"),
                                       (letters[2], middle_x, top + 1, "center", "top"),
                                       (letters[3], middle_x, bottom - 1, "center", "bottom")):
                ax.text(x, y, text, color="yellow", fontsize=8, ha=ha, va=va)
            if r == 0:
                ax.text(c * (cell_w + gap) + cell_w / 2, -1, name, fontsize=9, ha="center", va="bottom")
        ax.text(-2, r * (cell_h + gap) + cell_h / 2, sequences[r] + (" (missing)" if missing[r] else ""),
                fontsize=9, ha="right", va="center", rotation=90, parse_math=False)
    ax.imshow(tiled, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    # parse_math=False: an id such as "Pat$x^$1" is text, not a formula that fails to render.
    fig.suptitle(f"{patient_id}  (slice through voxel {centre})", fontsize=9, y=1.0, va="top", parse_math=False)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def registration_board(path: Path, patient_id: str, image: np.ndarray, sequences: Sequence[str], reference: str,
                       registered: Mapping[str, Mapping]) -> None:
    """A PNG: per registered sequence, a checkerboard of it and the reference in the three planes
    through the volume's centre (edges that jump between squares are misalignment), titled with
    the transform's rotation, shift and final metric, and its flag."""
    from datasets.raw_steps import checkerboard

    rows = [s for s in sequences if s in registered]
    centre = tuple(s // 2 for s in image.shape[1:])
    fixed = image[sequences.index(reference)].astype(np.float32)
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows) + 0.3), squeeze=False)
    for r, sequence in enumerate(rows):
        moving = image[sequences.index(sequence)].astype(np.float32)
        record = registered[sequence]
        for c, name in enumerate(_PLANES):
            ax = axes[r, c]
            ax.imshow(checkerboard(plane(fixed, name, centre), plane(moving, name, centre)), cmap="gray",
                      interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(name, fontsize=9)
        axes[r, 0].set_axis_on()
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        axes[r, 0].set_ylabel(f"{sequence} on {reference}\nrotation {record['rotation_deg']:.1f} deg\nshift "
                              f"{record['shift_mm']:.1f} mm, MI {record['metric']:.3f}"
                              + (f"\nFLAGGED: {record['flag']}" if record.get("flag") else ""),
                              fontsize=7, color="red" if record.get("flag") else "black")
    fig.suptitle(f"{patient_id}: registration checkerboards", fontsize=9, parse_math=False)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A table as the report makes them (pandas escapes every cell; the same class and style)."""
    frame = pd.DataFrame([[str(v) for v in row] for row in rows], columns=[str(h) for h in headers])
    return frame.to_html(index=False, border=0, classes="t", na_rep="")


def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def _clinical_section(manifest: Mapping) -> list[str]:
    """How the clinical table was read: the event coding, and the rows without images (a count and
    the first few ids, never one line each: a table of millions of rows keeps the page small)."""
    clinical = manifest.get("clinical") or {}
    lines = []
    if clinical.get("event_note"):
        lines.append(f"<p>Event coding: {html.escape(str(clinical['event_note']))}.</p>")
    unmatched = clinical.get("unmatched_rows") or {}
    if unmatched.get("count"):
        first = ", ".join(str(pid) for pid in unmatched.get("first", []))
        lines.append(f"<p>Clinical rows without an image folder: {int(unmatched['count'])} (not converted); the "
                     f"first: {html.escape(first)}.</p>")
    return ["<h2>Clinical table</h2>", *lines] if lines else []


def _unrecognised_section(manifest: Mapping) -> list[str]:
    """Image files that matched no sequence (or several): not converted, with how to name them."""
    from datasets.sequences import PATTERN_HINT

    rows = [(pid, text) for pid, texts in sorted((manifest.get("unrecognised") or {}).items()) for text in texts]
    if not rows:
        return []
    return ["<h2>Unrecognised image files</h2>",
            f"<p>{len(rows)} image files are unrecognised: they matched no sequence, or several, and were not used "
            f"(never guessed; the sequence is zero-filled and flagged missing). To use them, "
            f"{html.escape(PATTERN_HINT)}.</p>",
            _table(["patient", "file"], rows)]


def write_report(store_path: Path, attrs: Mapping, manifest: Mapping) -> Path:
    """Write ``qc/index.html`` inside the store from its attributes and manifest."""
    qc_dir = Path(store_path) / QC_DIR
    qc_dir.mkdir(exist_ok=True)
    patients = manifest.get("patients", {})
    ok = {pid: r for pid, r in patients.items() if r.get("status") == "ok"}
    excluded = dict(manifest.get("excluded", {}))
    excluded.update({pid: r.get("reason", "") for pid, r in patients.items() if r.get("status") != "ok"})
    problems = [(pid, p) for pid, r in sorted(patients.items()) for p in r.get("info", {}).get("problems", [])]
    problems += [(pid, f"excluded: {reason}") for pid, reason in sorted(excluded.items())]
    sections = [
        f"<h1>Cohort store QC: {html.escape(Path(store_path).name)}</h1>",
        f"<p>{len(ok)} patients converted, {len(excluded)} excluded. Sequences {attrs['sequences']}, "
        f"shape {attrs['shape']} (RAS x, y, z). Created {attrs.get('created', '')} by {attrs.get('software', '')}.</p>",
        "<h2>Preprocessing</h2>", _table(["parameter", "value"], sorted(attrs["preprocessing"].items())),
        "<h2>Problems found</h2>", _table(["patient", "problem"], problems) if problems else "<p>None.</p>",
        *_clinical_section(manifest),
        *_unrecognised_section(manifest),
        "<h2>Patients</h2>",
    ]
    for pid, record in sorted(ok.items()):
        info = record.get("info", {})
        before = info.get("before", {})
        rows = [(k, _fmt(v["shape"]), _fmt(v["spacing"])) for k, v in before.items()]
        after = info.get("after", {})
        rows.append(("output", _fmt(after.get("shape", [])), _fmt(after.get("spacing", []))))
        stats = [(k, f"{s['raw_mean']:.4g}", f"{s['raw_std']:.4g}", f"{s['raw_p_low']:.4g}", f"{s['raw_p_high']:.4g}")
                 for k, s in info.get("intensity", {}).items()]
        raw = info.get("raw_steps", {})
        registered = [(k, r["kind"], r["rotation_deg"], r["shift_mm"], r["metric"], r["seconds"], r.get("flag") or "")
                      for k, r in raw.get("registration", {}).items()]
        sections += [
            f"<h3 id='{html.escape(pid)}'>{html.escape(pid)}</h3>",
            _table(["grid", "shape (voxels)", "spacing (mm)"], rows),
            _table(["sequence", "mean in mask", "sd", "clip low", "clip high"], stats),
        ]
        if raw:
            steps = ", ".join(f"{k} {v:.1f} s" for k, v in raw.get("seconds", {}).items())
            sections.append(f"<p>Raw-export steps ({html.escape(steps)}); reference sequence "
                            f"{html.escape(str(raw.get('reference')))}"
                            + (f"; brain mask from {html.escape(raw['brain_mask_from'])}" if raw.get("brain_mask_from")
                               else "") + ".</p>")
        if registered:
            sections += [_table(["sequence", "transform", "rotation (deg)", "shift (mm)", "final MI", "seconds",
                                 "flag"], registered),
                         f"<img loading='lazy' src='{html.escape(Path(record.get('registration_board', '')).name)}' "
                         f"alt='registration of {html.escape(pid)}'>"]
        sections += [
            # The page lives in qc/ beside the montages; the manifest records paths from the store root.
            f"<img loading='lazy' src='{html.escape(Path(record.get('montage', '')).name)}' alt='montage of {html.escape(pid)}'>",
        ]
    style = ("<style>body{font-family:sans-serif;max-width:60em} table.t{border-collapse:collapse;margin:.5em 0} "
             ".t td,.t th{border:1px solid #ccc;padding:2px 6px;font-size:90%}</style>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>QC</title>{style}</head><body>{''.join(sections)}</body></html>"
    out = qc_dir / "index.html"
    out.write_text(page)
    return out
