"""The pages `study.predict` writes: one HTML page per scored patient (its montage, survival curve
and Grad-CAM map, with the numbers and what they mean) and an index of all of them.

Every text and attribute is escaped (`html.escape`): a patient id or a folder name is data, never
markup; file names made from ids go through `datasets.file_names.safe_name`.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from datasets.file_names import safe_name  # noqa: E402

STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:1em auto;padding:0 1em}"
         "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
         "th{background:#eee}.high{color:#b00;font-weight:bold}.note{color:#555;font-size:90%}")


def _page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def _img(source: str, alt: str, width: int) -> str:
    return f"<img src='{html.escape(source)}' alt='{html.escape(alt)}' width='{int(width)}'>"


def survival_figure(row: pd.Series, times: list[float], path: Path) -> None:
    """The patient's survival curve at the model's evaluation times (a step function)."""
    values = [1.0] + [float(row[f"surv_{t:g}"]) for t in times]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.step([0.0, *times], values, where="post", color="tab:blue", label="this patient")
    ax.axvline(365, color="grey", lw=0.8, ls=":")
    ax.annotate(f"1 year: {float(row['surv_365']):.2f}", (365, float(row["surv_365"])), textcoords="offset points",
                xytext=(6, 6), fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("days from the scan")
    ax.set_ylabel("predicted survival probability")
    ax.set_title("survival curve (mean of the fold models)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_pages(out: Path, scores: pd.DataFrame, patients, meta: dict, model_uri: str, maps: dict) -> Path:
    """Pages under `out`/pages (one per patient) and `out`/index.html; returns the index.
    `patients`: `analysis.scoring.NewPatients`; `maps`: patient -> Grad-CAM map (may be empty)."""
    from analysis.gradcam import overlay, save_nifti
    from datasets import qc

    pages = out / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    times = [float(t) for t in meta["eval_times"]]
    cutoff = float(meta["dpi_cutoff"])
    about = (f"Model {model_uri}: cell {meta['cell']} of study {meta['study']} (task {meta['task']}, inputs "
             f"{meta['inputs']}), a mean of {meta['folds']} fold models. DPI: the mean of the fold models' deep prognostic "
             "index (higher: shorter survival), put on the scale of the development cohort's out-of-fold DPI"
             + ("" if "dpi_scale" in meta else " (not here: this model was logged before it recorded that scale)")
             + f"; risk group: above the development cut-off {cutoff:+.3f} (the median out-of-fold DPI of the "
             "development cohort) is high.")
    rows = []
    for i, pid in enumerate(patients.ids):
        row = scores.iloc[i]
        stem = safe_name(pid)
        montage, curve = f"{stem}_montage.png", f"{stem}_survival.png"
        qc.montage(pages / montage, pid, patients.images[i], list(meta["sequences"]), patients.masks[i], None,
                   patients.missing[i])
        survival_figure(row, times, pages / curve)
        body = [f"<p><a href='../index.html'>all patients</a></p><h1>Patient {html.escape(pid)}</h1>",
                f"<p class='note'>{html.escape(about)}</p>",
                "<table><tr><th>DPI</th><th>risk group</th><th>survival at 1 year</th></tr>"
                f"<tr><td>{row['dpi']:+.3f}</td><td class='{html.escape(row['risk_group'])}'>"
                f"{html.escape(row['risk_group'])}</td><td>{row['surv_365']:.2f}</td></tr></table>",
                "<h2>Survival curve</h2>", _img(curve, f"survival curve of {pid}", 520)]
        if pid in maps:
            name = f"{stem}_gradcam"
            overlay(patients.images[i].astype(np.float32), list(meta["sequences"]), maps[pid], patients.masks[i],
                    None, f"{pid}: DPI {row['dpi']:+.2f} ({row['risk_group']} risk)", pages / f"{name}.png")
            save_nifti(maps[pid], patients.affines[i], pages / f"{name}.nii.gz")
            body += ["<h2>Grad-CAM</h2><p class='note'>Where the fold models' DPI reads the image (mean of the folds' "
                     "maps; for an image+clinical model, its image branch). A map shows what the network used, "
                     f"not where the tumour is. NIfTI: {html.escape(name)}.nii.gz.</p>",
                     _img(f"{name}.png", f"Grad-CAM of {pid}", 720)]
        body += ["<h2>Preprocessed images</h2>", _img(montage, f"montage of {pid}", 720)]
        notes = patients.problems.get(pid) or []
        missing = [s for s, m in zip(meta["sequences"], patients.missing[i]) if m]
        if missing:
            notes = [f"sequence(s) {', '.join(missing)} missing: zero-filled, as in training", *notes]
        if notes:
            body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes) + "</ul>")
        (pages / f"{stem}.html").write_text(_page(f"Patient {pid}", body), encoding="utf-8")
        rows.append(f"<tr><td style='text-align:left'><a href='pages/{html.escape(stem)}.html'>{html.escape(pid)}</a>"
                    f"</td><td>{row['dpi']:+.3f}</td><td class='{html.escape(row['risk_group'])}'>"
                    f"{html.escape(row['risk_group'])}</td><td>{row['surv_365']:.2f}</td></tr>")
    excluded = "".join(f"<li>{html.escape(pid)}: {html.escape(why)}</li>" for pid, why in patients.excluded.items())
    body = ["<h1>New patients scored</h1>", f"<p class='note'>{html.escape(about)}</p>",
            "<table><tr><th>patient</th><th>DPI</th><th>risk group</th><th>survival at 1 year</th></tr>",
            *rows, "</table>", "<p>All numbers: <a href='predictions.csv'>predictions.csv</a>.</p>"]
    if excluded:
        body.append(f"<h2>Not scored</h2><ul>{excluded}</ul>")
    index = out / "index.html"
    index.write_text(_page("New patients scored", body), encoding="utf-8")
    return index
