"""How well direct synthesis fits P's BN statistics, per model and learning rate (label-free).

For every model (``--models``, as ``panel.py`` loads them) and synthesis learning rate (``--lrs``),
``--images`` images are synthesized with the defaults otherwise (``DirectConfig``, ``--seed``) and
scored by the scale-free BN misfit (``bn_loss(relative=True)``, no jitter) beside a batch of as many
real training images: the fit the synthesis reaches, measured without labels or test images.
Example (the README's figures, "The synthesis learning rate")::

    python benchmarks/synth_fit.py --models cifar_resnet20 cifar_resnet32 --lrs 0.1 0.25 0.5 1.0

Prints one line per run; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import emit
from panel import load_model

from dfq_search.models.zoo import RECIPES
from dfq_search.synth.bn import bn_loss, bn_statistics
from dfq_search.synth.direct import DirectConfig, synthesize_images

MODELS = ["cifar_resnet20", "cifar_resnet32", *RECIPES]


def misfit(model: torch.nn.Module, x: torch.Tensor) -> float:
    """The scale-free BN misfit of one batch (0 when its statistics are P's running ones)."""
    with torch.no_grad(), bn_statistics(model) as stats:
        model(x)
        return float(bn_loss(stats, relative=True))


def run_model(name: str, args: argparse.Namespace) -> dict:
    bundle, train, _ = load_model(name, torch.device("cpu"))
    model = bundle.model.eval()
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.images]
    out = {"real": misfit(model, bundle.preprocess.normalize(train.images[pick])), "lr": {}}
    shape = tuple(bundle.preprocess.example_input().shape[1:])
    for lr in args.lrs:
        start = time.perf_counter()
        x, _ = synthesize_images(model, shape, bundle.num_classes, args.images, config=DirectConfig(lr=lr),
                                 preprocess=bundle.preprocess, seed=args.seed)  # fmt: skip
        fit = misfit(model, x)
        out["lr"][str(lr)] = {"misfit": fit, "seconds": time.perf_counter() - start}
        print(f"{name} lr {lr}: misfit {fit:.4f} (real {out['real']:.4f})", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=["cifar_resnet20"])
    p.add_argument("--lrs", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {m: run_model(m, args) for m in args.models}
    emit({"benchmark": "synth_fit", "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
