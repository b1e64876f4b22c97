"""``smoke``: the smallest real study, for tests (2 folds, 2 epochs, tiny networks)."""

from search_spaces._space import Choice, LogUniform, Protocol, SearchSpace

SPACE = SearchSpace(
    name="smoke",
    summary="for tests: 2 folds, 2 epochs, tiny networks, lr search only",
    distributions={"lr": LogUniform(1e-4, 3e-3), "batch_size": Choice((4, 8))},
    reference={"lr": 1e-3, "batch_size": 4},
    protocols={
        "full": Protocol(folds=2, epochs=2, num_samples=2, grace_epochs=1, width=0.25, depth=0.2,
                         fixed={"warmup_epochs": 0, "cox_memory": 0, "augmentation": 0.0}),
        "demo": Protocol(folds=2, epochs=2, num_samples=2, grace_epochs=1, width=0.25, depth=0.2,
                         fixed={"warmup_epochs": 0, "cox_memory": 0, "augmentation": 0.0}),
    },
)
