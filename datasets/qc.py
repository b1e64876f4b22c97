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


def montage(path: Path, patient_id: str, image: np.ndarray, sequences: Sequence[str], mask: np.ndarray,
            label: np.ndarray | None, missing: Sequence[bool]) -> None:
    """Write a PNG: one row per sequence, columns axial, coronal, sagittal."""
    centre = slice_centre(mask, label)
    rows = len(sequences)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows), squeeze=False)
    for r, sequence in enumerate(sequences):
        volume = image[r].astype(np.float32)
        low, high = (np.percentile(volume[mask > 0], (1, 99)) if mask.any() and not missing[r] else (0.0, 1.0))
        for c, name in enumerate(_PLANES):
            ax = axes[r, c]
            ax.imshow(plane(volume, name, centre), cmap="gray", vmin=low, vmax=max(high, low + 1e-6),
                      interpolation="nearest")
            if label is not None and label.any():
                ax.contour(plane(label.astype(np.float32), name, centre), levels=[0.5], colors="red", linewidths=0.7)
            left, right, top, bottom = _PLANES[name][1]
            for text, xy, ha, va in ((left, (0.02, 0.5), "left", "center"), (right, (0.98, 0.5), "right", "center"),
                                     (top, (0.5, 0.98), "center", "top"), (bottom, (0.5, 0.02), "center", "bottom")):
                ax.text(*xy, text, transform=ax.transAxes, color="yellow", fontsize=8, ha=ha, va=va)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(sequence + (" (missing)" if missing[r] else ""), fontsize=9)
    fig.suptitle(f"{patient_id}  (slice through voxel {centre})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


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
        sections += [
            f"<h3 id='{html.escape(pid)}'>{html.escape(pid)}</h3>",
            _table(["grid", "shape (voxels)", "spacing (mm)"], rows),
            _table(["sequence", "mean in mask", "sd", "clip low", "clip high"], stats),
            # The page lives in qc/ beside the montages; the manifest records paths from the store root.
            f"<img loading='lazy' src='{html.escape(Path(record.get('montage', '')).name)}' alt='montage of {html.escape(pid)}'>",
        ]
    style = "<style>body{font-family:sans-serif;max-width:60em} table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}</style>"
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>QC</title>{style}</head><body>{''.join(sections)}</body></html>"
    out = qc_dir / "index.html"
    out.write_text(page)
    return out
