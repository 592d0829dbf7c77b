"""Train the panel models reproducibly (once; cached), then score them at full precision.

Each model is trained by its recipe in ``dfq_search.models.zoo`` (CIFAR: ``cifar10/train-5k`` with
crop + flip and distillation from the pretrained ResNet-20; ``mnist_dwnet``: the train split of
MNIST 5k), saved to ``$DFQ_SEARCH_CACHE/zoo/<name>-v1.pt`` (skipped when there; ``--force`` trains
again) and scored on held-out real images: the JPEG CIFAR-10 test set (10,000 images) or MNIST 5k's
test split (1,000). The weights are plain state dicts, for every command::

    dfq-search eval --model cifar_vgg --weights ~/.cache/dfq_search/zoo/cifar_vgg-v1.pt \\
        --data ../shared/data/cifar10/test

Example (all four, one thread, about half an hour on an idle core)::

    python benchmarks/zoo.py --threads 1

Prints each epoch, then a table; the last line is one JSON object: per model FP top-1, parameters,
training seconds (those recorded when the weights were trained) and the weights' path.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import emit

from dfq_search.evaluate import evaluate
from dfq_search.models import create_model
from dfq_search.models.zoo import RECIPES, ensure_trained, load_split, zoo_meta, zoo_path
from dfq_search.report import format_table


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--epochs", type=int, default=None, help="default: each recipe's (own cache file)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and scoring")
    p.add_argument("--force", action="store_true", help="train again even when cached")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rows, result = [], {}
    for name in args.models:
        cached = zoo_path(name, args.epochs).is_file() and not args.force
        print(f"{name}: {'cached' if cached else 'training'} ({zoo_path(name, args.epochs)})", flush=True)
        path = ensure_trained(
            name, epochs=args.epochs, force=args.force, threads=args.threads,
            progress=lambda line, name=name: print(f"  {name} {line}", flush=True),
        )  # fmt: skip
        meta = zoo_meta(path) or {}
        bundle = create_model(name, weights=path)
        start = time.perf_counter()
        top1 = evaluate(bundle.model, load_split(name, "test"), bundle.preprocess).top1
        params = sum(p.numel() for p in bundle.model.parameters())
        seconds = meta.get("seconds")
        epochs = meta.get("recipe", {}).get("epochs")
        print(f"{name}: FP top-1 {top1:.2f}% (scored in {time.perf_counter() - start:.0f} s)", flush=True)
        rows.append(
            {"model": name, "params": params, "epochs": epochs, "train s": seconds, "FP top-1 %": top1}
        )
        result[name] = {
            "top1": round(top1, 2), "params": params, "train_seconds": seconds, "epochs": epochs,
            "train_threads": meta.get("threads"), "weights": str(path),
        }  # fmt: skip
    print(format_table(rows))
    emit(result)


if __name__ == "__main__":
    main()
