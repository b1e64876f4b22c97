"""Analysis: the study report, its sections and figures, external validation and added value."""
