"""Can a development store's models be applied to another store? An external cohort is the
models' input only if it was converted the same way: the same sequences in the same channel order,
the same grid at about the same voxel size, and the preprocessing that decides what a voxel's value
means (normalisation, brain mask, registration). Anything else would give numbers, not an error, so
`study.run --external` and `analysis.report --external` both refuse it with this check."""

from __future__ import annotations

from datasets.errors import StudyError

# Preprocessing parameters that change the input a model sees (`datasets.preprocessing_config`).
# `sequences` and `shape` are compared from the store's attributes; the margin of the crop does not
# change voxel values. `--spacing` is only the finest spacing allowed (a head is resampled coarser
# until it fits the shape), so the voxel sizes the patients got are compared instead.
MEANING = ("clip_percentiles", "mask_fraction", "register", "bias_correct", "brain_mask", "reference_sequence")
VOXEL_RATIO = 1.25  # median voxel sizes further apart than this: the networks would see another scale


def median_voxel_mm(store) -> float:
    import numpy as np

    usable = store.usable()
    sizes = [float(np.linalg.norm(np.asarray(store.affine(int(i)), dtype=float)[:3, 0])) for i in usable]
    return float(np.median(sizes)) if sizes else float("nan")


def compatibility_problem(external, development) -> str | None:
    """Why the models of `development` cannot be applied to `external` (CohortStores), or None."""
    if list(external.sequences) != list(development.sequences):
        order = " (the same sequences in another channel order)" if sorted(external.sequences) == sorted(
            development.sequences) else ""
        return (f"sequences {list(external.sequences)} differ from the development store's "
                f"{list(development.sequences)}{order}")
    if tuple(external.shape) != tuple(development.shape):
        return f"shape {list(external.shape)} differs from the development store's {list(development.shape)}"
    ours, theirs = development.attrs.get("preprocessing", {}), external.attrs.get("preprocessing", {})
    differ = [f"{key} {theirs.get(key, 'unset')!r} vs {ours.get(key, 'unset')!r}" for key in MEANING
              if theirs.get(key) != ours.get(key)]
    if differ:
        return "preprocessing differs from the development store's: " + "; ".join(differ)
    if len(external.usable()) == 0:
        return "the store has no usable patients"
    theirs_mm, ours_mm = median_voxel_mm(external), median_voxel_mm(development)
    if max(theirs_mm, ours_mm) > VOXEL_RATIO * min(theirs_mm, ours_mm):
        return (f"its patients' median voxel is {theirs_mm:.2f} mm and the development store's {ours_mm:.2f} mm: "
                "the networks would see the anatomy at another scale")
    return None


def check_external(external, development, flag: str) -> None:
    """Raise StudyError naming `flag` and the store if `external` cannot take `development`'s models."""
    problem = compatibility_problem(external, development)
    if problem:
        raise StudyError(f"{flag} {external.path}: {problem}; convert it with the development store's "
                         "--sequences, --shape and preprocessing flags (its attributes list them)")


def development_matches(external, development) -> dict[str, str]:
    """The external store's patients whose images are a development patient's (a source file of the
    same SHA-256, as the converter recorded them), each with that development patient's id: models
    that trained on them would score them in-sample."""
    def digests(store) -> dict[str, set[str]]:
        out = {}
        for pid, record in store.manifest.get("patients", {}).items():
            if isinstance(record, dict) and record.get("status") == "ok":
                out[pid] = {source.get("sha256") for source in record.get("sources", {}).values()
                            if isinstance(source, dict) and source.get("sha256")}
        return out

    owner = {digest: pid for pid, mine in sorted(digests(development).items()) for digest in mine}
    return {pid: owner[min(mine & owner.keys())] for pid, mine in sorted(digests(external).items())
            if mine & owner.keys()}
