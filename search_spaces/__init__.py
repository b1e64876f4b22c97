"""Named search spaces: distributions plus a fixed protocol; `SPACES` is the registry."""

from search_spaces import literature_priors, smoke, wide
from search_spaces._space import (REFERENCE_BACKBONES, TASKS, Cell, Choice, LogUniform, Protocol, SearchSpace,
                                  SearchSpaceError, Task, Uniform, cell_name)

_BUILTIN = (literature_priors.SPACE, wide.SPACE, smoke.SPACE)  # a new space: its module, added here
BUILTIN_SPACES = frozenset(s.name for s in _BUILTIN)
# Built-in spaces, plus a user's space file once `study.config.resolve` has read it.
SPACES: dict[str, SearchSpace] = {s.name: s for s in _BUILTIN}


def get_space(name: str) -> SearchSpace:
    """The space registered under `name`; KeyError lists the valid names."""
    if name not in SPACES:
        raise KeyError(f"unknown search space {name!r}; valid spaces are {sorted(SPACES)}")
    return SPACES[name]


__all__ = ["BUILTIN_SPACES", "REFERENCE_BACKBONES", "SPACES", "TASKS", "Cell", "Choice", "LogUniform", "Protocol",
           "SearchSpace", "SearchSpaceError", "Task", "Uniform", "cell_name", "get_space"]
