"""manymodels: train and batch-score one LightGBM model per partition, fanned out with Ray.

The names below are imported on first use, not with the package: ``manymodels --help`` and a Ray
worker that runs one module's tasks do not pay for pandas, pyarrow, LightGBM and Ray they never touch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from manymodels.data import InputError
    from manymodels.registry import ModelVersion, Registry, RegistryError
    from manymodels.score import ScoreSummary, score
    from manymodels.spec import JobSpec, SpecError, load_spec
    from manymodels.storage import StorageError
    from manymodels.train import RunSummary, train

__all__ = [
    "InputError",
    "JobSpec",
    "ModelVersion",
    "Registry",
    "RegistryError",
    "RunSummary",
    "ScoreSummary",
    "SpecError",
    "StorageError",
    "load_spec",
    "score",
    "train",
]

__version__ = "0.1.0"

# Where each public name lives (the package's modules are its architecture; this only re-exports).
_HOME = {
    "InputError": "data", "JobSpec": "spec", "ModelVersion": "registry", "Registry": "registry",
    "RegistryError": "registry", "RunSummary": "train", "ScoreSummary": "score", "SpecError": "spec",
    "StorageError": "storage", "load_spec": "spec", "score": "score", "train": "train",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'manymodels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"manymodels.{home}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """This package, keeping ``manymodels.train`` and ``manymodels.score`` the functions.

    Importing a submodule binds it to its package's attribute of the same name. Eager imports used
    to rebind ``train`` and ``score`` to the functions right after; lazily, the first
    ``import manymodels.train`` (a Ray worker, a test) would leave the module there instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("train", "score") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
