"""Post-training quantization: calibration, AdaRound/BRECQ/QDrop reconstruction, ModCap, ZeroQ bits."""

from dfq_search.ptq.adaround import AdaRoundWeightQuantizer, attach_adaround_, beta_at, finalize_adaround_
from dfq_search.ptq.calibrate import calibrate_ranges_, reestimate_bn_
from dfq_search.ptq.config import PTQConfig, ReconConfig
from dfq_search.ptq.modcap import (
    data_capacity,
    data_free_capacity,
    differentials,
    modcap_chains,
    select_pairs,
)
from dfq_search.ptq.pipeline import PTQResult, oscillation, reconstruct_, rise, run_ptq
from dfq_search.ptq.reconstruct import reconstruct_chain_
from dfq_search.ptq.sensitivity import allocate_bits, sensitivity_plan, zeroq_sensitivity
from dfq_search.ptq.units import Unit, capture, find_units, unit_errors

__all__ = [
    "AdaRoundWeightQuantizer",
    "PTQConfig",
    "PTQResult",
    "ReconConfig",
    "Unit",
    "allocate_bits",
    "attach_adaround_",
    "beta_at",
    "calibrate_ranges_",
    "capture",
    "data_capacity",
    "data_free_capacity",
    "differentials",
    "finalize_adaround_",
    "find_units",
    "modcap_chains",
    "oscillation",
    "reconstruct_",
    "reconstruct_chain_",
    "reestimate_bn_",
    "rise",
    "run_ptq",
    "select_pairs",
    "sensitivity_plan",
    "unit_errors",
    "zeroq_sensitivity",
]
