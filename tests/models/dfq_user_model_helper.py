"""Functions that tests name as ``dfq_user_model_helper:<function>`` user models."""

from torch import nn


def build(num_classes: int = 10) -> nn.Module:
    """A small BN CNN for 1-channel 16x16 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


def fixed_head() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))


def not_a_module() -> str:
    return "not a model"


NOT_CALLABLE = 3
