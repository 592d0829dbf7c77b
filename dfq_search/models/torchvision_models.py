"""torchvision classifiers, built with ``weights=None`` and loaded from a local file only.

Registered by plain name: ``resnet18``, ``resnet34``, ``resnet50``, ``mobilenet_v2``,
``mobilenet_v3_large``; any other classification model as ``tv:<name>``. Nothing is downloaded:
the preprocessing comes from the metadata of torchvision's default weights enum (resize, crop,
mean, std), which ships inside the wheel. Images are resized bilinearly for every model.
"""

from __future__ import annotations

from pathlib import Path

from dfq_search.errors import unknown_name
from dfq_search.models.base import IMAGENET_PREPROCESS, ModelBundle, Preprocess, seeded_build
from dfq_search.models.registry import register_model
from dfq_search.models.weights import load_weights

REGISTERED = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large")


def classification_models() -> list[str]:
    """The names of torchvision's image classification models (not detection, video, ...)."""
    import torchvision  # imported on use: it takes a second, and most runs never need it

    return torchvision.models.list_models(module=torchvision.models)


def torchvision_preprocess(name: str) -> Preprocess:
    """Resize/crop/mean/std of ``name``'s default torchvision weights; ImageNet's when unknown."""
    import torchvision

    try:
        transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        return Preprocess(
            input_size=int(transform.crop_size[0]),
            resize=int(transform.resize_size[0]),
            mean=tuple(transform.mean),
            std=tuple(transform.std),
            channels=3,
        )
    except (AttributeError, ValueError, TypeError, IndexError):
        return IMAGENET_PREPROCESS


def build_torchvision(name: str, weights: Path | None = None, num_classes: int | None = None) -> ModelBundle:
    """torchvision model ``name`` (random init with seed 0, or ``weights`` loaded strictly)."""
    valid = classification_models()
    if name not in valid:
        raise unknown_name(
            "torchvision model", name, valid, "pass one of torchvision's classification models"
        )
    import torchvision

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = seeded_build(lambda: torchvision.models.get_model(name, weights=None, **kwargs))
    for m in model.modules():
        # In-place activations would change a tensor a forward hook has already seen.
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    if weights is not None:
        load_weights(model, weights, name=name)
    head = num_classes if num_classes is not None else 1000
    return ModelBundle(model.eval(), torchvision_preprocess(name), name, head)


def _register(name: str) -> None:
    @register_model(name)
    def factory(weights: Path | None, num_classes: int | None) -> ModelBundle:
        return build_torchvision(name, weights, num_classes)

    factory.__doc__ = f"torchvision {name} (ImageNet preprocessing)."
    factory.any_input = True  # type: ignore[attr-defined]  # runs at any size: preprocessing may change


for _name in REGISTERED:
    _register(_name)
