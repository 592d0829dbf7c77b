"""Reconstructed groups kept for later runs: a campaign's trials whose plans agree on the first units.

A group's reconstruction depends only on what comes before it and on itself: P, the calibration
images, the settings, the groups so far and the bits of every quantized layer that runs up to the
group's last one (in call order). Two runs that agree on all of that reconstruct the group alike, so
the second one loads the first one's result (the group's modules' state: rounded weights, ranges,
learned step sizes) instead of redoing its steps. Mixed-precision trials often share their first
units (the pinned 8-bit stem, then the first blocks TPE has settled on); an early-stopped trial runs
only those.

    store = UnitStore(folder)                  # a campaign's ``units/`` folder
    run_ptq(p, plan, batches, config, reuse=store)

Entries are written atomically, one file per group; the folder is kept under ``max_bytes`` by
removing the least recently used entries; an unreadable entry is recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from dfq_search.ptq.reconstruct import ChainRecord
from dfq_search.ptq.units import Unit
from dfq_search.quant.layers import QUANT_LAYERS

log = logging.getLogger(__name__)


def _digest(h: hashlib.blake2b, t: Tensor) -> None:
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def run_context(p: nn.Module, data: Sequence[Tensor], *settings: object) -> str:
    """A hash of P's state, the calibration images and ``settings`` (dataclass configs, the device)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((torch.__version__, *settings)).encode())
    for name, t in p.state_dict().items():
        h.update(name.encode())
        _digest(h, t)
    for x in data:
        _digest(h, x)
    return h.hexdigest()


def _call_order(q: nn.Module, example: Tensor) -> list[str]:
    """Q's quantized layers in the order a forward pass calls them (each once)."""
    names = {m: n for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS)}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, _a: order.append(names[m])) for m in names]
    try:
        with torch.no_grad():
            q(example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def group_keys(
    q: nn.Module, units: Sequence[Unit], groups: Sequence[Sequence[int]], context: str, example: Tensor
) -> list[str]:
    """The key of every group: ``context``, the groups up to it and the bits of every quantized layer
    called up to the group's last one."""
    order = _call_order(q, example)
    bits = [(n, q.get_submodule(n).w_bits, q.get_submodule(n).a_bits) for n in order]
    keys, last = [], -1
    for g, group in enumerate(groups):
        layers = {n for i in group for n in units[i].layers}
        last = max([last, *(order.index(n) for n in layers if n in order)])
        names = [[units[i].name for i in grp] for grp in groups[: g + 1]]
        keys.append(
            hashlib.blake2b(repr((context, names, bits[: last + 1])).encode(), digest_size=16).hexdigest()
        )
    return keys


class UnitStore:
    """Reconstructed groups under ``folder/<key>.pt`` (at most ``max_bytes`` in all)."""

    def __init__(self, folder: str | Path, max_bytes: int = 2**30) -> None:
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.hits = 0

    def load(self, key: str, modules: dict[str, nn.Module]) -> ChainRecord | None:
        """Load the group ``key`` into ``modules`` (path -> Q's module); its record, or None if absent."""
        path = self.folder / f"{key}.pt"
        try:
            entry = torch.load(path, weights_only=True)
            for name, module in modules.items():
                module.load_state_dict(entry["state"][name])
        except FileNotFoundError:
            return None
        except Exception as err:  # a torn or stale entry is recomputed, never fatal
            log.warning("unit store: %s unreadable (%s); reconstructing the group again", path, err)
            return None
        path.touch()
        self.hits += 1
        r = entry["record"]
        return ChainRecord(tuple(r["units"]), r["loss_before"], r["loss_after"], 0.0, reused=True)

    def save(self, key: str, modules: dict[str, nn.Module], record: ChainRecord) -> None:
        """Keep the reconstructed ``modules`` of a group under ``key`` (nothing if writing fails)."""
        state = {
            n: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for n, m in modules.items()
        }
        rec = {
            "units": list(record.units),
            "loss_before": record.loss_before,
            "loss_after": record.loss_after,
        }
        path = self.folder / f"{key}.pt"
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save({"state": state, "record": rec}, tmp)
            os.replace(tmp, path)
            self._trim()
        except OSError as err:  # a full disk: the run goes on without the entry
            log.warning("unit store: could not keep %s (%s)", path, err)
            tmp.unlink(missing_ok=True)

    def _trim(self) -> None:
        entries = []
        for f in self.folder.glob("*.pt"):
            try:
                st = f.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in entries)
        for _, size, f in sorted(entries):
            if total <= self.max_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size
