"""Initializers: map a weight tensor to the initial mask scores, and the registry that names them."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar, Union

import torch
from torch import Tensor

from ..registry import Registry

__all__ = ["InitSpec", "Initializer", "get_initializer", "list_initializers", "register_initializer"]

_INITIALIZERS: Registry[Callable[..., "Initializer"]] = Registry(
    "initializer", hint="Pass one of these names, an Initializer, or a callable weight -> scores")


def register_initializer(name: str, *, override: bool = False) -> Callable:
    """Register an :class:`Initializer` subclass, or a function ``weight -> scores``, under ``name``.

    Returns a decorator that registers its argument and returns it unchanged.

    Example:
        >>> @register_initializer("negated_magnitude")
        ... def negated_magnitude(weight):
        ...     return -weight.abs()
    """

    def factory(obj: Any) -> Callable[..., Initializer]:
        if isinstance(obj, type) and issubclass(obj, Initializer):
            return obj
        if callable(obj):
            return lambda **kwargs: FunctionInitializer(obj, **kwargs)
        raise TypeError(f"register_initializer expects an Initializer subclass or a callable, got {obj!r}")

    return _INITIALIZERS.decorator(name, override=override, wrap=factory)


#: The registered initializer names, sorted.
list_initializers = _INITIALIZERS.names


class Initializer:
    """Base class: ``scores = scale * normalize(raw(weight)) + shift``.

    Args:
        scale: multiplies the scores (after normalisation).
        shift: added last; e.g. ``shift=3`` starts every gate near ``sigmoid(3) = 0.95``.
        normalize: standardise the raw scores per tensor (zero mean, unit std), so layers of different
            weight scale start alike.
    """

    #: True when the initializer needs ``dL/dw`` from one training batch.
    needs_grad: ClassVar[bool] = False
    #: True when the initializer needs the root mean square of each input feature of the layer over calibration
    #: batches (``input_norm=``, see :mod:`lightning_masks.masking.activations`).
    needs_inputs: ClassVar[bool] = False
    #: How many calibration batches an initializer that ``needs_inputs`` reads (set by it, e.g. :class:`Wanda`).
    batches: int
    #: True when the keep bits of :meth:`initial_keep` are held for the whole fit (no mask update changes them).
    fixed: bool = False

    def __init__(self, *, scale: float = 1.0, shift: float = 0.0, normalize: bool = False) -> None:
        for name, value in (("scale", scale), ("shift", shift)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
        self.scale = float(scale)
        self.shift = float(shift)
        self.normalize = bool(normalize)

    def raw(self, weight: Tensor, *, grad: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Return the unscaled scores for ``weight``."""
        raise NotImplementedError

    def initial_keep(self, weight: Tensor) -> Tensor | None:
        """The keep bits the masks start from (a bool tensor of the weight's shape), or ``None``: all kept."""
        return None

    @torch.no_grad()
    def __call__(
        self, weight: Tensor, *, grad: Tensor | None = None, generator: torch.Generator | None = None,
        input_norm: Tensor | None = None,
    ) -> Tensor:
        evidence = {"input_norm": input_norm} if self.needs_inputs else {}
        scores = self.raw(weight, grad=grad, generator=generator, **evidence).to(device=weight.device,
                                                                                 dtype=weight.dtype)
        if self.normalize:
            scores = standardized(scores)
        return scores * self.scale + self.shift

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


@torch.no_grad()
def standardized(scores: Tensor) -> Tensor:
    """``scores`` with zero mean and unit standard deviation over the tensor (all zeros where they are all equal)."""
    centered = scores - scores.mean()
    return centered / scores.std() if scores.max() > scores.min() else torch.zeros_like(scores)


def _noise(weight: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of the weight's shape, drawn on the CPU so a seed gives the same draw anywhere."""
    return torch.randn(weight.shape, generator=generator, dtype=torch.float32)


@register_initializer("magnitude")
class Magnitude(Initializer):
    """``scores = |w|`` (the seed article's magnitude init)."""

    def raw(self, weight, *, grad, generator):
        return weight.abs()


@register_initializer("stddev")
class StdDev(Initializer):
    """Every score equals ``std(w)`` (the seed article's stddev init)."""

    def raw(self, weight, *, grad, generator):
        std = weight.float().std() if weight.numel() > 1 else weight.new_zeros(())
        return torch.full_like(weight, float(std))


@register_initializer("magnitude_noise")
class MagnitudeNoise(Initializer):
    """``scores = |w| + N(0, noise_scale)`` (the seed article's magnitude + noise init).

    Args:
        noise_scale: standard deviation of the added Gaussian noise, ``>= 0``.
    """

    def __init__(self, noise_scale: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (math.isfinite(noise_scale) and noise_scale >= 0):
            raise ValueError(f"noise_scale must be a finite float >= 0, got {noise_scale!r}; try 0.01")
        self.noise_scale = float(noise_scale)

    def raw(self, weight, *, grad, generator):
        return weight.abs() + self.noise_scale * _noise(weight, generator).to(weight.device)


@register_initializer("constant")
class Constant(Initializer):
    """Every score equals ``value`` (with ``value=0`` every gate starts at 0.5)."""

    def __init__(self, value: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.value = float(value)

    def raw(self, weight, *, grad, generator):
        return torch.full_like(weight, self.value)


@register_initializer("uniform")
class Uniform(Initializer):
    """Scores drawn from ``U(low, high)``, independent of the weight."""

    def __init__(self, low: float = 0.0, high: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not low < high:
            raise ValueError(f"uniform init needs low < high, got low={low!r}, high={high!r}")
        self.low, self.high = float(low), float(high)

    def raw(self, weight, *, grad, generator):
        draw = torch.rand(weight.shape, generator=generator, dtype=torch.float32)
        return (self.low + (self.high - self.low) * draw).to(weight.device)


@register_initializer("kaiming")
class Kaiming(Initializer):
    """Kaiming-uniform scores, bound ``1/sqrt(fan_in)``, as edge-popup (https://arxiv.org/abs/1911.13299)."""

    def raw(self, weight, *, grad, generator):
        fan_in = weight[0].numel() if weight.dim() > 1 else weight.numel()
        draw = torch.rand(weight.shape, generator=generator, dtype=torch.float32)
        return ((2 * draw - 1) / math.sqrt(max(fan_in, 1))).to(weight.device)


@register_initializer("snip")
class Snip(Initializer):
    """``scores = |w * dL/dw|`` from one training batch (SNIP, https://arxiv.org/abs/1810.02340)."""

    needs_grad = True

    def raw(self, weight, *, grad, generator):
        if grad is None:
            raise ValueError("the snip initializer needs the weight's gradient from one batch (grad=...)")
        return (weight * grad).abs()


@register_initializer("wanda")
class Wanda(Initializer):
    """Wanda's criterion ``|w_ij| * rms_j(x)`` for the masks: the weight's magnitude times the root mean square of its
    input feature over calibration batches of the training data (Wanda, Sun et al. 2023,
    https://arxiv.org/abs/2306.11695; dividing ``||x_j||_2`` by the square root of the rows seen keeps its ranking).

    The callback runs ``batches`` training batches of the dense network in eval mode with forward hooks on the
    masked layers (summed over DDP ranks) before the first step, and keeps each layer's ``rms_j(x)`` in its gate
    (``MaskGate.set_input_norm``): the default ``importance="effective_weight"`` then ranks ``|w * gate| * rms_j(x)``
    for the whole fit, Wanda's score of the effective weight (with the scores held, Wanda's own masks). The scores
    themselves start as magnitude's, ``|w|``, so that every gate starts alike: a gate ``sigmoid(|w| * rms_j(x))``
    would start the network with its high-norm input features scaled up against the others (under a per-tensor
    rescale, ``MaskState(compact=True)``), by up to 2x where LLMs have outlier features. Under
    ``Selector(relaxation=...)`` the pattern logits start from ``|w| * rms_j(x)`` (Wanda's prior).

    Supported layers: ``nn.Linear`` (PEFT adapters' base layers included), transformers' ``Conv1D``, ungrouped
    ``ConvNd`` and ``ConvTransposeNd`` (one norm per input channel).

    Args:
        batches: calibration batches, ``>= 1`` (Wanda used 128 sequences of 2048 tokens).
    """

    needs_inputs = True

    def __init__(self, batches: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ValueError(f"batches must be an int >= 1 (calibration batches of the training data), got "
                             f"{batches!r}; try 8")
        self.batches = batches

    def raw(self, weight, *, grad, generator, input_norm=None):
        if input_norm is None:
            raise ValueError("the wanda initializer needs the input features' norms (input_norm=..., see "
                             "lightning_masks.masking.activations.input_norms); MaskPruningCallback gathers them")
        return weight.abs()  # the norms rank through the gate's input_norm (see the class docstring)


@register_initializer("from_zeros")
class FromZeros(Initializer):
    """Start from the mask a one-shot pruner left in the weights (Wanda, SparseGPT, llm-compressor, torch.ao): its
    zeros are pruned before the first step, so they stay zero while the weights train.

    As a prior (``fixed=False``) the scores start as magnitude's, ``|w|``, and the masks learn on from there: later
    updates prune more up to the target sparsity and never revive the one-shot zeros. With ``fixed=True`` that mask
    is kept for the whole fit: no update changes it, the scores are frozen at a gate of exactly 1, and the fit is
    masked fine-tuning of the kept weights.

    Args:
        fixed: hold the one-shot mask (no mask learning) instead of starting from it.
    """

    def __init__(self, fixed: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(fixed, bool):
            raise ValueError(f"fixed must be True or False, got {fixed!r}")
        self.fixed = fixed

    def raw(self, weight, *, grad, generator):
        return torch.full_like(weight, HELD_SCORE) if self.fixed else weight.abs()

    def initial_keep(self, weight: Tensor) -> Tensor:
        return weight != 0


#: The score of a held mask's kept entries: ``sigmoid(30)`` rounds to exactly 1 in float32 and bfloat16.
HELD_SCORE = 30.0


class FunctionInitializer(Initializer):
    """Wrap any callable ``weight -> scores`` as an initializer."""

    def __init__(self, fn: Callable[[Tensor], Tensor], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fn = fn

    def raw(self, weight, *, grad, generator):
        return self.fn(weight)


def _options(factory: Callable[..., Initializer]) -> list[str]:
    """The keyword options an initializer class accepts (its own and the base class's)."""
    classes = factory.__mro__ if isinstance(factory, type) else (FunctionInitializer, Initializer)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return sorted({name for cls in classes if "__init__" in vars(cls) and issubclass(cls, Initializer)
                   for name, p in inspect.signature(cls.__init__).parameters.items()
                   if p.kind in named and name not in ("self", "fn")})


#: What :func:`get_initializer` accepts.
InitSpec = Union[str, Initializer, Callable[[Tensor], Tensor]]


def get_initializer(spec: InitSpec, **kwargs: Any) -> Initializer:
    """Return an :class:`Initializer` from a registered name (with its ``kwargs``), an instance or a callable.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or kwargs with a non-name spec.
    """
    if isinstance(spec, Initializer):
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} apply to a named initializer, not to {spec!r}")
        return spec
    if isinstance(spec, str):
        factory = _INITIALIZERS.get(spec)
        try:
            return factory(**kwargs)
        except TypeError as error:
            options = _options(factory)
            raise ValueError(f"initializer {spec!r} does not take {sorted(kwargs)} ({error}); its options are "
                             f"{options}") from error
    if callable(spec):
        return FunctionInitializer(spec, **kwargs)
    raise TypeError(f"init must be a name, an Initializer or a callable weight -> scores, got {spec!r}")
