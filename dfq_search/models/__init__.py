"""Models by name, with their preprocessing.

``create_model("cifar_resnet20", weights="resnet20.th", device="cpu")`` gives a ``ModelBundle``
(model in eval mode, its ``Preprocess``, name and number of classes); ``list_models()`` the names.
"""

from dfq_search.models import cifar_resnet, digits, panel, tiny, torchvision_models  # noqa: F401 (register)
from dfq_search.models.base import ModelBundle, Preprocess
from dfq_search.models.registry import create_model, list_models, register_model
from dfq_search.models.weights import load_weights, read_state_dict

__all__ = [
    "ModelBundle",
    "Preprocess",
    "create_model",
    "list_models",
    "load_weights",
    "read_state_dict",
    "register_model",
]
