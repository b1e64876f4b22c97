"""``wide``: broad ranges for a first exploration (lr 1e-6..1e-2, weight decay up to 1e-2,
batches 8-64, Adam/AdamW/SGD, either survival head for the OS tasks); the full protocol trains image
and image+clinical cells, the fusion's clinical branch linear or with 16 or 64 hidden units."""

from datasets.clinical_features import IMAGE, IMAGE_CLINICAL
from search_spaces._space import Choice, LogUniform, Protocol, SearchSpace, Uniform

SPACE = SearchSpace(
    name="wide",
    summary="broad ranges (lr 1e-6..1e-2, wd 1e-8..1e-2, batch 8-64, three optimizers) for exploration",
    distributions={
        "lr": LogUniform(1e-6, 1e-2),
        "weight_decay": LogUniform(1e-8, 1e-2),
        "batch_size": Choice((8, 16, 32, 64)),
        "dropout": Uniform(0.0, 0.6),
        "augmentation": Uniform(0.0, 2.0),
        "optimizer": Choice(("adamw", "adam", "sgd")),
    },
    reference={"lr": 1e-4, "weight_decay": 1e-6, "batch_size": 64, "dropout": 0.0, "augmentation": 1.0,
               "optimizer": "adamw"},
    protocols={
        "full": Protocol(folds=10, epochs=200, num_samples=40, grace_epochs=10, reduction_factor=3,
                         fixed={"warmup_epochs": 5, "patience": 40, "selection_fraction": 0.15}, checkpoint_every=5,
                         inputs=(IMAGE, IMAGE_CLINICAL),
                         distributions={"clinical_hidden": Choice((0, 16, 64)), "clinical_dropout": Uniform(0.0, 0.6)},
                         reference={"clinical_hidden": 0, "clinical_dropout": 0.0}),
        "demo": Protocol(folds=3, epochs=20, num_samples=3, grace_epochs=5, reduction_factor=2, width=0.25,
                         depth=0.2, fixed={"warmup_epochs": 1},
                         distributions={"batch_size": Choice((8, 16))}, reference={"batch_size": 16, "lr": 1e-3},
                         checkpoint_every=5),
    },
)
