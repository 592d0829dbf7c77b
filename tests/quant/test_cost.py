import torch
from torch import nn

from dfq_search.quant import BitPlan, model_cost, quantized_copy


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),  # 8x8 -> 4x4
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise, 4x4
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()


def test_cost_matches_hand_computation():
    plan = BitPlan({"_default": {"w": 4, "a": 4}, "0": {"w": 8, "a": 8}, "3": {"w": 2, "a": 6}})
    cost = model_cost(small_model(), plan, torch.zeros(1, 3, 8, 8))
    by_name = {c.name: c for c in cost.layers}
    # conv0: 4x3x3x3 = 108 weights; 4x4x4 outputs x 27 MACs each = 1728; input is the image (32 bits)
    assert (by_name["0"].params, by_name["0"].macs) == (108, 1728)
    assert by_name["0"].size_bits == 108 * 8 and by_name["0"].bops == 1728 * 8 * 32
    # depthwise conv: 4x1x3x3 = 36 weights; 64 outputs x 9 MACs = 576
    assert (by_name["3"].params, by_name["3"].macs) == (36, 576)
    assert by_name["3"].size_bits == 36 * 2 and by_name["3"].bops == 576 * 2 * 6
    # linear: 640 weights and 640 MACs at W4A4
    assert by_name["6"].size_bits == 640 * 4 and by_name["6"].bops == 640 * 16
    assert cost.size_bits == 864 + 72 + 2560
    assert cost.bops == 1728 * 256 + 576 * 12 + 640 * 16
    assert abs(cost.bits_per_param - (864 + 72 + 2560) / (108 + 36 + 640)) < 1e-12


def test_the_two_weight_bit_figures_are_named_apart():
    """bits_per_param counts every layer (a float one at 32 bits); mean_weight_bits the quantized ones
    (the search's budget figure): one name per figure."""
    plan = BitPlan({"6": {"w": 4, "a": 4}})
    cost = model_cost(small_model(), plan, torch.zeros(1, 3, 8, 8))
    assert cost.mean_weight_bits({"6"}) == 4.0
    assert cost.bits_per_param == cost.size_bits / cost.params > 4.0
    assert "bits_per_param" in cost.summary() and "mean_w_bits" not in cost.summary()


def test_float_layers_count_32_bits_and_cost_ignores_batch_size():
    plan = BitPlan({"6": {"w": 4, "a": 4}})
    one = model_cost(small_model(), plan, torch.zeros(1, 3, 8, 8))
    many = model_cost(small_model(), plan, torch.zeros(5, 3, 8, 8))
    assert one == many
    assert one.layers[0].size_bits == 108 * 32 and one.layers[2].bops == 640 * 16


def test_cost_of_a_quantized_model_is_the_same():
    plan = BitPlan.uniform(3, 4)
    x = torch.zeros(1, 3, 8, 8)
    q = quantized_copy(small_model(), plan, x)
    assert model_cost(q, plan, x) == model_cost(small_model(), plan, x)
