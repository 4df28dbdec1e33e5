"""manymodels: train and batch-score one LightGBM model per partition, fanned out with Ray."""

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
