"""The gate: ``w * sigmoid(scores / T) * keep`` as a fused autograd function, its straight-through and binary forms,
MaskGate, the channel bias and the cached evaluation."""

import pytest
import torch
from helpers import prune
from torch import nn
from torch.nn.utils import parametrize

from lightning_masks import MaskGate, attach
from lightning_masks.masking.gate import ChannelBias, binary_gated, gate_value, gated, straight_through_gated


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        MaskGate(torch.zeros(2), temperature=0)


def plain_gate(weight, scores, keep, temperature, scale=None):
    """The formula as plain autograd would run it: ``weight * (gate * keep)``."""
    return weight * (gate_value(scores, temperature, scale) * keep)


def gate_inputs(dtype=torch.float64, per_channel=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(5, 6, generator=generator, dtype=dtype)
    shape = (5, 1) if per_channel else (5, 6)
    scores = torch.randn(shape, generator=generator, dtype=dtype)
    keep = torch.rand(shape, generator=generator) > 0.4
    keep.view(-1)[0] = False
    scale = 1.0 / torch.sigmoid(torch.randn(shape, generator=generator, dtype=dtype))
    return weight, scores, keep, scale


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_gate_gradients_pass_gradcheck_in_float64(per_channel, rescale, temperature):
    weight, scores, keep, scale = gate_inputs(per_channel=per_channel)
    weight.requires_grad_()
    scores.requires_grad_()
    scale = scale if rescale else None
    temperature = torch.tensor(temperature, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w, s: gated(w, s, keep, temperature, scale), (weight, scores))
    # and the fused function really ran (not the plain-autograd fallback)
    assert type(gated(weight, scores, keep, temperature, scale).grad_fn).__name__ == "_GatedBackward"


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_fused_gate_matches_the_plain_formula_in_float32(per_channel, rescale, temperature):
    weight, scores, keep, scale = gate_inputs(torch.float32, per_channel)
    scale = scale if rescale else None
    temperature = torch.tensor(temperature)
    grad = torch.randn(5, 6)
    results = []
    for fn in (plain_gate, gated):
        w, s = weight.clone().requires_grad_(), scores.clone().requires_grad_()
        out = fn(w, s, keep, temperature, scale)
        out.backward(grad)
        results.append((out.detach(), w.grad, s.grad))
    (out_a, gw_a, gs_a), (out_b, gw_b, gs_b) = results
    assert torch.equal(out_a, out_b)  # same values, bit for bit
    assert torch.allclose(gw_a, gw_b, rtol=1e-6, atol=0) and torch.allclose(gs_a, gs_b, rtol=1e-6, atol=0)
    assert torch.all(gs_b[~keep] == 0) and torch.all(gs_b[keep] != 0)  # pruned scores get exactly zero
    with torch.no_grad():
        assert torch.equal(gated(weight, scores, keep, temperature, scale), out_a)  # the no-grad path agrees


def test_fused_gate_computes_only_the_gradients_asked_for():
    weight, scores, keep, scale = gate_inputs(torch.float32)
    for frozen in ("weight", "scores"):
        grads = []
        for fn in (plain_gate, gated):
            w = weight.clone().requires_grad_(frozen != "weight")
            s = scores.clone().requires_grad_(frozen != "scores")
            fn(w, s, keep, torch.tensor(0.5), scale).sum().backward()
            assert (w.grad is None) == (frozen == "weight") and (s.grad is None) == (frozen == "scores")
            grads.append(s.grad if frozen == "weight" else w.grad)
        assert torch.allclose(*grads, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rescale", [False, True])
def test_fused_gate_saves_one_gate_sized_buffer_for_backward(rescale):
    weight, scores, keep, scale = gate_inputs(torch.float32)
    scale = scale if rescale else None
    w, s = weight.clone().requires_grad_(), scores.clone().requires_grad_()
    inputs = {w.data_ptr(), s.data_ptr(), keep.data_ptr()} | ({scale.data_ptr()} if rescale else set())

    def saved_bytes(fn):
        fresh = []

        def pack(tensor):
            if tensor.data_ptr() not in inputs:
                fresh.append(tensor.untyped_storage().nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(w, s, keep, torch.tensor(0.5), scale)
        return sum(fresh)

    assert saved_bytes(gated) == scores.numel() * 4 < saved_bytes(plain_gate)  # k = sigmoid * keep, only


def test_masked_module_trains_the_same_as_the_plain_formula():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    weight = layer.weight.detach().clone()
    [entry] = attach(layer, rescale=True, temperature=0.5, per_channel=False)
    prune(entry.gate, slice(None, None, 3), flat=True)
    x = torch.randn(7, 6)
    layer(x).square().sum().backward()
    s = entry.gate.scores.detach().clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = x @ plain_gate(w, s, entry.gate.keep, entry.gate.temperature, entry.gate.gate_scale).t() + layer.bias
    out.square().sum().backward()
    assert torch.allclose(entry.weight.grad, w.grad, rtol=1e-5) and torch.allclose(entry.gate.scores.grad, s.grad,
                                                                                    rtol=1e-5)


def test_channel_bias_goes_through_the_fused_gate_with_the_same_values():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    bias = layer.bias.detach().clone()
    [entry] = attach(layer, rescale=True, per_channel=True)
    prune(entry.gate, 1)
    gate = entry.gate
    expected = bias * (gate_value(gate.scores, gate.temperature, gate.gate_scale) * gate.keep).reshape(bias.shape)
    assert isinstance(layer.parametrizations.bias[0], ChannelBias)
    assert torch.equal(layer.bias, expected) and layer.bias[1] == 0
    layer.bias.sum().backward()
    assert gate.scores.grad[1].item() == 0 and gate.scores.grad[0].item() != 0


def test_gate_forward_values_are_unchanged_under_cached_evaluation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    masked = attach(model, rescale=True, temperature=2.0)
    prune(masked[0].gate, 0)
    x = torch.randn(3, 5)
    training = model(x)
    with torch.no_grad(), parametrize.cached():
        assert torch.equal(model(x), training.detach())


def test_masked_module_works_under_torch_func_transforms():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    [entry] = attach(layer, rescale=True)
    prune(entry.gate, (0, 0))
    params = dict(layer.named_parameters())
    x = torch.randn(5, 4)

    def loss(p):
        return torch.func.functional_call(layer, p, (x,)).square().sum()

    grads = torch.func.grad(loss)(params)
    loss(params).backward()  # the fused path
    assert torch.allclose(grads["parametrizations.weight.original"], entry.weight.grad, rtol=1e-5)
    assert torch.allclose(grads["parametrizations.weight.0.scores"], entry.gate.scores.grad, rtol=1e-5)


def test_masked_module_evaluates_an_ensemble_of_weights_under_vmap():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    [entry] = attach(layer, rescale=True)
    prune(entry.gate, (0, 0))
    weights = torch.randn(2, 3, 4)  # batched over the weight alone: scores, keep and scale are shared
    x = torch.randn(5, 4)
    with torch.no_grad():
        outs = torch.func.vmap(lambda w: torch.func.functional_call(
            layer, {"parametrizations.weight.original": w}, (x,)))(weights)
        for w, out in zip(weights, outs):
            entry.weight.copy_(w)
            assert torch.equal(out, layer(x))


@pytest.mark.parametrize("grad", [False, True])
def test_the_gate_keeps_the_wider_dtype_of_weight_and_scores(grad):
    weight, scores, keep, scale = gate_inputs(torch.float32)
    weight = weight.double().requires_grad_(grad)  # a float64 weight under float32 scores: the product is float64
    with torch.set_grad_enabled(grad):
        out = gated(weight, scores, keep, 1.0, scale)
        assert out.dtype == torch.float64 and torch.equal(out, plain_gate(weight, scores, keep, 1.0, scale))


@pytest.mark.parametrize("rescale", [False, True])
def test_straight_through_gate_has_gated_values_and_gives_pruned_scores_the_kept_gradient(rescale):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator).requires_grad_()
    scores = torch.randn(6, 5, generator=generator).requires_grad_()
    keep = torch.rand(6, 5, generator=generator) > 0.5
    scale = 1.0 / torch.sigmoid(scores.detach() / 0.7) if rescale else None
    upstream = torch.randn(6, 5, generator=generator)

    def grads(function, keep):
        out = function(weight, scores, keep, 0.7, scale)
        return (out, *torch.autograd.grad((out * upstream).sum(), (weight, scores)))

    out, grad_weight, grad_scores = grads(straight_through_gated, keep)
    reference, ref_weight, ref_scores = grads(gated, keep)
    _, _, all_kept_scores = grads(gated, torch.ones_like(keep))
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grad_weight, ref_weight)  # pruned weights get no gradient: zero where ~keep
    assert torch.all(grad_weight[~keep] == 0)
    torch.testing.assert_close(grad_scores, all_kept_scores)  # every score's gradient as if kept
    assert torch.all(grad_scores[~keep] != 0) and torch.all(ref_scores[~keep] == 0)


# ------------------------------------------------------------------------------------------ binary masks
@pytest.mark.parametrize("compact", [False, True])
def test_binary_gate_computes_the_weight_times_keep_and_trains_scores_straight_through(compact):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator)  # frozen: no gradient asked
    scores = torch.randn(6, 5, generator=generator).requires_grad_()
    keep = torch.rand(6, 5, generator=generator) > 0.5
    upstream = torch.randn(6, 5, generator=generator)
    out = binary_gated(weight, scores, keep, 0.7)
    assert torch.equal(out, torch.where(keep, weight, 0.0))  # bit for bit: the kept weights are the weight's own
    (grad,) = torch.autograd.grad((out * upstream).sum(), scores)
    reference = gated(weight, scores, torch.ones_like(keep), 0.7)  # the soft gate's gradient, every entry
    (expected,) = torch.autograd.grad((reference * upstream).sum(), scores)
    torch.testing.assert_close(grad, expected)
    layer = nn.Linear(5, 6, bias=False)
    layer.weight.requires_grad_(False)
    [entry] = attach(layer, compact=compact, rescale=True, frozen="mask")
    entry.gate.set_keep(keep)
    assert entry.gate.is_binary and torch.equal(layer.weight, torch.where(keep, entry.weight, 0.0))
