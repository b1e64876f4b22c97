"""The parameters of preprocessing (`datasets.preprocess`), importable without MONAI: command-line
entry points build them from their flags before anything heavy is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from datasets.errors import ImageError


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters; recorded in every store's manifest.

    Attributes
    ----------
    sequences
        Channel order of the output.
    shape
        Output spatial shape (x, y, z) in voxels.
    spacing
        Isotropic resampling spacing in mm before cropping.
    clip_percentiles
        Intensity percentiles (inside the mask) clipped to before z-scoring.
    mask_fraction
        A voxel belongs to the head mask where some sequence exceeds this fraction of its
        99th percentile.
    margin
        Voxels kept around the head mask when cropping.
    register, bias_correct, brain_mask, reference_sequence
        Steps for raw exports (`datasets.raw_steps`): co-registration of every sequence to
        `reference_sequence` ("none", "rigid" or "affine"), N4 bias-field correction, and brain
        extraction (the stored mask and the normalisation then use the brain, not the head).
    """

    sequences: tuple[str, ...] = ("t1", "t1c", "t2", "flair")
    shape: tuple[int, int, int] = (120, 120, 78)
    spacing: float = 1.0
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    mask_fraction: float = 0.1
    margin: int = 2
    register: str = "none"
    bias_correct: bool = False
    brain_mask: bool = False
    reference_sequence: str = "t1c"

    @property
    def raw_steps(self) -> bool:
        return self.register != "none" or self.bias_correct or self.brain_mask

    def __post_init__(self) -> None:
        if self.register not in ("none", "rigid", "affine"):
            raise ImageError(f"--register must be rigid or affine, got {self.register!r}")
        if len(self.shape) != 3 or any(int(s) < 8 for s in self.shape):
            raise ImageError(f"shape must be three sizes of at least 8 voxels, got {self.shape}")
        from datasets.plausibility import spacing_problem

        problem = spacing_problem(self.spacing)
        if problem:
            raise ImageError(problem)
        if not 0 <= self.clip_percentiles[0] < self.clip_percentiles[1] <= 100:
            raise ImageError(f"clip percentiles must be 0 <= low < high <= 100, got {self.clip_percentiles}")
        if not self.sequences:
            raise ImageError("at least one sequence is needed")
        if len(set(self.sequences)) != len(self.sequences):
            raise ImageError(f"sequences must differ, got {list(self.sequences)}")

    def to_dict(self) -> dict:
        """The recorded parameters; the raw-export steps only when used, so that stores made
        before they existed still match their settings."""
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not self.raw_steps:
            for key in ("register", "bias_correct", "brain_mask", "reference_sequence"):
                del values[key]
        return values
