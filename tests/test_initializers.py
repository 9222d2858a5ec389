"""Initializer registry and the definitions of each initializer."""

import pytest
import torch

from lightning_masks import Initializer, get_initializer, list_initializers, register_initializer
from lightning_masks.masking.initializers import _INITIALIZERS, MagnitudeNoise

WEIGHT = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
GRAD = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
NORM = torch.rand(1, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", list_initializers())
def test_every_initializer_gives_finite_scores_of_the_weight_shape_and_is_seeded(name):
    init = get_initializer(name)
    first = init(WEIGHT, grad=GRAD, input_norm=NORM, generator=torch.Generator().manual_seed(3))
    second = init(WEIGHT, grad=GRAD, input_norm=NORM, generator=torch.Generator().manual_seed(3))
    assert first.shape == WEIGHT.shape and first.dtype == WEIGHT.dtype
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


def test_the_seed_articles_three_exactly():
    assert torch.equal(get_initializer("magnitude")(WEIGHT), WEIGHT.abs())
    assert torch.equal(get_initializer("stddev")(WEIGHT), torch.full_like(WEIGHT, WEIGHT.std().item()))
    noisy = get_initializer("magnitude_noise")(WEIGHT, generator=torch.Generator().manual_seed(0))
    noise = noisy - WEIGHT.abs()
    assert abs(noise.std().item() - 0.01) < 0.001 and abs(noise.mean().item()) < 0.001
    bigger = MagnitudeNoise(noise_scale=0.1)(WEIGHT, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(bigger - WEIGHT.abs(), noise * 10, atol=1e-6)


def test_random_initializers_differ_between_seeds():
    for name in ("magnitude_noise", "uniform", "kaiming"):
        init = get_initializer(name)
        a = init(WEIGHT, generator=torch.Generator().manual_seed(0))
        b = init(WEIGHT, generator=torch.Generator().manual_seed(1))
        assert not torch.equal(a, b), name


def test_constant_uniform_kaiming_and_snip_definitions():
    assert torch.equal(get_initializer("constant", value=2.0)(WEIGHT), torch.full_like(WEIGHT, 2.0))
    uniform = get_initializer("uniform", low=-1.0, high=3.0)(WEIGHT)
    assert uniform.min() >= -1 and uniform.max() <= 3 and uniform.std() > 0.5
    kaiming = get_initializer("kaiming")(WEIGHT)
    assert kaiming.abs().max() <= 1 / 32**0.5 and kaiming.abs().max() > 0.9 / 32**0.5
    assert torch.equal(get_initializer("snip")(WEIGHT, grad=GRAD), (WEIGHT * GRAD).abs())
    assert get_initializer("snip").needs_grad
    with pytest.raises(ValueError, match="needs the weight's gradient"):
        get_initializer("snip")(WEIGHT)


def test_wandas_scores_start_on_the_weights_scale_its_norms_ranking_through_the_gate():
    """The input norms rank through the gate's input_norm (test_llm.py); the scores start as magnitude's, so that
    every gate starts alike."""
    wanda = get_initializer("wanda", batches=2)
    assert wanda.needs_inputs and not wanda.needs_grad and wanda.batches == 2
    assert torch.equal(wanda(WEIGHT, input_norm=NORM), WEIGHT.abs())
    with pytest.raises(ValueError, match="needs the input features' norms"):
        wanda(WEIGHT)
    with pytest.raises(ValueError, match="batches must be an int >= 1"):
        get_initializer("wanda", batches=0)


def test_from_zeros_keeps_the_nonzeros_and_scores_them_by_magnitude_or_holds_them():
    weight = WEIGHT.masked_fill(WEIGHT.abs() < 0.5, 0.0)
    prior = get_initializer("from_zeros")
    assert torch.equal(prior.initial_keep(weight), weight != 0) and not prior.fixed
    assert torch.equal(prior(weight), weight.abs())
    held = get_initializer("from_zeros", fixed=True)
    assert held.fixed and torch.equal(torch.sigmoid(held(weight)), torch.ones_like(weight))
    assert all(get_initializer(name).initial_keep(weight) is None for name in list_initializers()
               if name != "from_zeros")


def test_scale_shift_and_normalize():
    plain = get_initializer("magnitude")(WEIGHT)
    assert torch.allclose(get_initializer("magnitude", scale=3.0, shift=-1.0)(WEIGHT), plain * 3 - 1)
    normalized = get_initializer("magnitude", normalize=True)(WEIGHT)
    assert abs(normalized.mean().item()) < 1e-5 and abs(normalized.std().item() - 1) < 1e-5
    assert torch.equal(normalized.flatten().argsort(),
                       plain.flatten().argsort())
    assert torch.equal(get_initializer("stddev", normalize=True)(WEIGHT), torch.zeros_like(WEIGHT))


def test_callable_and_instance_specs():
    assert torch.equal(get_initializer(lambda w: w * 2)(WEIGHT), WEIGHT * 2)
    instance = MagnitudeNoise(noise_scale=0.5)
    assert get_initializer(instance) is instance
    with pytest.raises(ValueError, match="apply to a named initializer"):
        get_initializer(instance, noise_scale=0.1)


def test_register_a_function_and_a_class():
    try:
        @register_initializer("test_negated")
        def negated(weight):
            return -weight.abs()

        @register_initializer("test_class")
        class Ones(Initializer):
            def raw(self, weight, *, grad, generator):
                return torch.ones_like(weight)

        assert "test_negated" in list_initializers() and "test_class" in list_initializers()
        assert torch.equal(get_initializer("test_negated", shift=1.0)(WEIGHT), 1 - WEIGHT.abs())
        assert torch.equal(get_initializer("test_class")(WEIGHT), torch.ones_like(WEIGHT))
        with pytest.raises(ValueError, match="registered already"):
            register_initializer("test_class")(Ones)
    finally:
        for name in ("test_negated", "test_class"):
            if _INITIALIZERS.find(name) is not None:
                _INITIALIZERS.remove(name)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown initializer 'magnitud'.*'magnitude', 'magnitude_noise'"):
        get_initializer("magnitud")


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_negative_noise_scale_is_refused(bad):
    with pytest.raises(ValueError, match=r"noise_scale must be a finite float >= 0, got"):
        get_initializer("magnitude_noise", noise_scale=bad)


def test_an_option_the_initializer_does_not_take_is_named_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"initializer 'magnitude' does not take \['noise_scale'\].*"
                                         r"its options are \['normalize', 'scale', 'shift'\]"):
        get_initializer("magnitude", noise_scale=0.1)
    with pytest.raises(ValueError, match=r"its options are \['noise_scale', 'normalize', 'scale', 'shift'\]"):
        get_initializer("magnitude_noise", noise_scal=0.1)
