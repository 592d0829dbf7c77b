"""The search campaign: a space file of per-layer bit choices, a budget and method knobs (paths into the
configs that own them), run as trials on a :class:`Runner` (Ray Tune: ``dfq_search.distributed``).
Nothing here imports Ray or ``dfq_search.distributed``."""

from dfq_search.search.campaign import CampaignOptions, finalize, prepare, run_campaign
from dfq_search.search.define import PlanSpace, SpaceFunction
from dfq_search.search.knobs import Knob, parse_knob
from dfq_search.search.method import game_config, ptq_config
from dfq_search.search.objective import FidelityScorer, LabelledScorer
from dfq_search.search.results import pareto_front, result_rows
from dfq_search.search.runner import Runner, TrialRecord, TrialsSpec
from dfq_search.search.space import SearchSpace, load_space, parse_space
from dfq_search.search.trial import TrialContext, run_trial

__all__ = [
    "CampaignOptions",
    "FidelityScorer",
    "Knob",
    "LabelledScorer",
    "PlanSpace",
    "Runner",
    "SearchSpace",
    "SpaceFunction",
    "TrialContext",
    "TrialRecord",
    "TrialsSpec",
    "finalize",
    "game_config",
    "load_space",
    "pareto_front",
    "parse_knob",
    "parse_space",
    "prepare",
    "ptq_config",
    "result_rows",
    "run_campaign",
    "run_trial",
]
