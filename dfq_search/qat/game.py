"""The generator-versus-Q game of data-free fine-tuning (GDFQ, DSG, AdaSG, AdaDFQ, LRQ).

Each iteration t (P and Q in eval mode throughout, the source in train mode):

1. (x, y) = G.sample(B); ONE forward of P (hooks collect the BN statistics), Q's forward when the
   sample loss needs it (without range tracking); L_G = Σ w_k term_k; G steps (Adam). Q's and P's
   parameters receive no gradient (``backward(inputs=G's parameters)``).
2. From t >= ``warmup`` on: Q steps (SGD) on L_Q(P(x) reused, Q(x.detach()), y); G receives nothing.
   While Q's activation ranges are not frozen they are tracked (EMA) during its first
   ``range_tracking`` steps, then frozen into learnable step sizes.

Metrics go to a reporter every ``log_every`` iterations; ``save``/``load`` checkpoint G, Q, both
optimisers, Q's schedule, the sampling RNG and the step, so a run resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from dfq_search.errors import DfqError, unknown_name
from dfq_search.qat.config import GameConfig
from dfq_search.qat.losses import Q_TERMS, q_objective
from dfq_search.qat.reporter import NullReporter, Reporter
from dfq_search.quant.quantize import act_quantizers, freeze_, set_observing_
from dfq_search.synth.generators import SOURCES, build_source
from dfq_search.synth.losses import TERMS, TermKnobs, TermParams, normalized_disagreement
from dfq_search.synth.objective import check_bounds, check_weights

FORMAT = "dfq_search.game/1"


def check_config(cfg: GameConfig) -> None:
    """Refuse, without a model, a config the game would refuse: its schedule, the terms and weights of
    both losses, the margin bounds when the margin term is on, the sample source's name."""
    _check_train(cfg)
    if "margin" in check_weights(cfg.sample_loss.weights, TERMS, "sample loss"):
        check_bounds(cfg.sample_loss.lambda_l, cfg.sample_loss.lambda_u)
    if cfg.source.name not in SOURCES:
        raise unknown_name("sample source", cfg.source.name, SOURCES, "set source.name to one of them")


def _check_train(cfg: GameConfig) -> None:
    t = cfg.train
    for name in ("iterations", "batch_size"):
        v = getattr(t, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DfqError(f"train.{name}", v, "an int >= 1", f"set train.{name}")
    if not 0 <= t.warmup < t.iterations:
        raise DfqError("train.warmup", t.warmup, f"0 <= warmup < iterations ({t.iterations})", "lower it")
    for name in ("q_lr", "q_weight_decay", "q_momentum"):
        if getattr(t, name) < 0:
            raise DfqError(f"train.{name}", getattr(t, name), "a number >= 0", f"set train.{name} >= 0")
    check_weights(cfg.q_loss.weights, Q_TERMS, "Q loss")


def _num_outputs(p: nn.Module, input_shape: tuple[int, ...], device) -> int:
    with torch.no_grad():
        return int(p(torch.zeros(1, *input_shape, device=device)).shape[-1])


def game_source(cfg: GameConfig, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """The sample source a game config asks for (the one place a SourceConfig becomes a source)."""
    s = cfg.source
    if s.name == "pixels":
        return build_source("pixels", num_classes, input_shape, cfg.train.seed, n=s.pixels)
    kwargs = {"latent_dim": s.latent_dim, "upsamples": s.upsamples, "conditional_bn": s.conditional_bn,
              "lka_kernels": tuple(s.lka_kernels), "lka_dilation": s.lka_dilation}  # fmt: skip
    if s.lka_after is not None:
        kwargs["lka_after"] = tuple(s.lka_after)
    return build_source(s.name, num_classes, input_shape, cfg.train.seed, **kwargs)


class Game:
    """One run of the game between a sample source G and the quantized model Q, judged by P."""

    def __init__(
        self, p: nn.Module, q: nn.Module, config: GameConfig, input_shape: tuple[int, int, int],
        num_classes: int, device: torch.device | str = "cpu", reporter: Reporter | None = None,
    ) -> None:  # fmt: skip
        from dfq_search.synth.objective import SampleObjective

        self.cfg, self.device = config, torch.device(device)
        self.p, self.q = p.eval(), q.eval()
        _check_train(config)
        if _num_outputs(self.p, input_shape, self.device) != num_classes:
            raise DfqError("num_classes disagrees with P's output", num_classes,
                           f"P has {_num_outputs(self.p, input_shape, self.device)} outputs",
                           "pass P's class count")  # fmt: skip
        sl, ql = config.sample_loss, config.q_loss
        params = TermParams(**{f.name: getattr(sl, f.name) for f in dataclasses.fields(TermKnobs)})
        self.objective = SampleObjective(self.p, sl.weights, params, input_shape, self.device)
        self.q_weights = check_weights(ql.weights, Q_TERMS, "Q loss")
        self.q_params = ql  # a QLossConfig is the QLossParams plus the weights
        self.source = game_source(config, num_classes, input_shape).to(self.device)
        self.opt_g = torch.optim.Adam(self.source.parameters(), lr=config.source.lr,
                                      betas=tuple(config.source.betas))  # fmt: skip
        self.q_train = [t for t in self.q.parameters() if t.requires_grad]
        tr = config.train
        nesterov = tr.q_nesterov and tr.q_momentum > 0
        self.opt_q = torch.optim.SGD(self.q_train, lr=tr.q_lr, momentum=tr.q_momentum,
                                     weight_decay=tr.q_weight_decay, nesterov=nesterov)  # fmt: skip
        q_steps = tr.iterations - tr.warmup
        milestones = sorted({max(1, int(f * q_steps)) for f in tr.q_lr_milestones})
        self.sched_q = torch.optim.lr_scheduler.MultiStepLR(self.opt_q, milestones, 0.1)
        self.gen = torch.Generator().manual_seed(tr.seed)
        self.reporter = reporter or NullReporter()
        self.step, self.q_steps = 0, 0
        self.tracking = any(not bool(a.frozen) for a in act_quantizers(self.q))

    def g_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """One generator step; returns (x, y, z_p, metrics) for the Q step to reuse."""
        self.source.train()
        set_observing_(self.q, False)
        x, y = self.source.sample(self.cfg.train.batch_size, self.gen, self.device)
        loss, terms, z_p = self.objective(x, y, self.q)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.source.parameters()))
        self.opt_g.step()
        return (
            x.detach(),
            y,
            z_p.detach(),
            {"g/loss": float(loss.detach()), **{f"g/{k}": v for k, v in terms.items()}},
        )

    def q_step(self, x: torch.Tensor, y: torch.Tensor, z_p: torch.Tensor) -> dict[str, float]:
        """One Q step on detached samples; tracks then freezes unfrozen activation ranges."""
        track = self.tracking and self.q_steps < self.cfg.train.range_tracking
        set_observing_(self.q, track)
        z_q = self.q(x)
        set_observing_(self.q, False)
        if self.tracking and not track:
            freeze_(self.q)
            self.tracking = False
        loss, terms = q_objective(self.q_weights, z_p, z_q, y, self.q_params)
        self.opt_q.zero_grad(set_to_none=True)
        loss.backward(inputs=self.q_train)
        self.opt_q.step()
        self.sched_q.step()
        self.q_steps += 1
        with torch.no_grad():
            agree = (z_q.argmax(1) == z_p.argmax(1)).float().mean().item()
            h = normalized_disagreement(z_p, z_q.detach()).mean().item()
        return {"q/loss": float(loss.detach()), "q/agreement": agree, "q/h_norm": h,
                **{f"q/{k}": v for k, v in terms.items()}}  # fmt: skip

    def run(self, until: int | None = None, checkpoint: str | Path | None = None) -> dict[str, float]:
        """Play iterations up to ``until`` (default: the configured total); returns the last metrics."""
        tr, last = self.cfg.train, {}
        end = min(until or tr.iterations, tr.iterations)
        while self.step < end:
            x, y, z_p, last = self.g_step()
            if self.step >= tr.warmup:
                last.update(self.q_step(x, y, z_p))
            self.step += 1
            if tr.log_every and self.step % tr.log_every == 0:
                self.reporter.scalars(self.step, last)
            if tr.image_every and self.step % tr.image_every == 0:
                self.reporter.images(self.step, "samples", x)
            if checkpoint and tr.checkpoint_every and self.step % tr.checkpoint_every == 0:
                self.save(checkpoint)
        return last

    def state_dict(self) -> dict:
        return {"format": FORMAT, "step": self.step, "q_steps": self.q_steps, "tracking": self.tracking,
                "config": asdict(self.cfg), "source": self.source.state_dict(), "q": self.q.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_q": self.opt_q.state_dict(),
                "sched_q": self.sched_q.state_dict(), "rng": self.gen.get_state()}  # fmt: skip

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
        return path

    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint written by :meth:`save` for the same models and config."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise DfqError(
                "not a game checkpoint", str(path), f"format {FORMAT}", "pass a file from Game.save"
            )
        self.source.load_state_dict(state["source"])
        self.q.load_state_dict(state["q"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_q.load_state_dict(state["opt_q"])
        self.sched_q.load_state_dict(state["sched_q"])
        self.gen.set_state(state["rng"])
        self.step, self.q_steps, self.tracking = state["step"], state["q_steps"], state["tracking"]
