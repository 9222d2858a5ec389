"""Layer kinds: for each maskable module type, which tensors are its weights and which axis holds its outputs.

The registry follows the initializers' idiom (:mod:`lightning_masks.masking.initializers`, after timm's
``_registry.py``): :func:`register_layer_kind` adds a kind, :func:`get_layer_kind` looks one up (a miss names the
registered ones), :func:`list_layer_kinds` lists them, and :func:`kind_of` finds the kind of a module instance (its most
specific registered class). A kind is keyed by its class's dotted path, so a class from a library that is not
imported (transformers' ``Conv1D``) is recognised by name without importing it. The default mask targets
are the weights of the registered kinds.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, TypeVar, Union, cast

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..registry import Registry

__all__ = [
    "LayerKind",
    "get_layer_kind",
    "kind_of",
    "list_layer_kinds",
    "output_axis",
    "register_layer_kind",
    "undeclared_layout",
    "weight_name",
]

_KINDS: Registry["LayerKind"] = Registry("layer kind")  # by dotted class path

Layer = TypeVar("Layer", bound=Union[type, str])


@dataclass(frozen=True)
class LayerKind:
    """What to mask on one module type.

    Args:
        tensors: globs on the module's own parameter names that are its weights, e.g. ``("weight",)`` or
            ``("weight_ih_l*", "weight_hh_l*")``.
        output_axis: the weight dimension that indexes the layer's output units (features, channels, gate
            rows): 0 for ``nn.Linear`` ``(out, in)`` and ``ConvNd`` ``(out, in/groups, *k)``, 1 for
            ``ConvTransposeNd`` ``(in, out/groups, *k)`` and transformers' ``Conv1D`` ``(in, out)``. Channel
            masks have one score per index of this axis; N:M groups run along the other axes.
    """

    tensors: tuple[str, ...] = ("weight",)
    output_axis: int = 0

    def tensor_names(self, module: nn.Module) -> list[str]:
        """The names of ``module``'s own parameters (parametrized ones included) that this kind masks."""
        return [n for n in own_tensor_names(module) if any(fnmatch.fnmatchcase(n, pattern) for pattern in self.tensors)]


def _dotted(layer: Union[type, str]) -> str:
    return layer if isinstance(layer, str) else f"{layer.__module__}.{layer.__qualname__}"


def register_layer_kind(
    layer: Optional[Layer] = None,
    *,
    tensors: tuple[str, ...] = ("weight",),
    output_axis: int = 0,
    override: bool = False,
) -> Union[Layer, Callable[[Layer], Layer]]:
    """Register a module class as a maskable layer kind; its instances (and subclasses') are then default targets.

    Args:
        layer: the class, or its dotted path (``"transformers.pytorch_utils.Conv1D"``) to match a class without
            importing its library. Omitted: returns a class decorator.
        tensors, output_axis: see :class:`LayerKind`.
        override: replace a kind registered already.

    Returns:
        ``layer`` unchanged (or the decorator).

    Raises:
        ValueError: the class is registered already and ``override`` is False, or ``output_axis`` is negative.

    Example:
        >>> @register_layer_kind(output_axis=1)
        ... class TransposedLinear(nn.Module):  # its weight has shape (in, out)
        ...     pass
        >>> get_layer_kind(TransposedLinear).output_axis
        1
    """
    if not (isinstance(output_axis, int) and output_axis >= 0):
        raise ValueError(f"output_axis must be an int >= 0 (the weight dimension of the output units), "
                         f"got {output_axis!r}")
    if isinstance(tensors, str) or not tensors or not all(isinstance(t, str) for t in tensors):
        raise ValueError(f"tensors must be a non-empty tuple of globs on parameter names, got {tensors!r}; "
                         "e.g. tensors=('weight',)")

    def decorator(cls: Layer) -> Layer:
        _KINDS.add(_dotted(cls), LayerKind(tuple(tensors), output_axis), override=override)
        return cls

    return decorator if layer is None else decorator(layer)


#: The dotted class paths of the registered layer kinds, sorted.
list_layer_kinds = _KINDS.names


def get_layer_kind(layer: Union[type, str]) -> LayerKind:
    """Return the kind registered for a class (or dotted path), or for its nearest registered base class.

    Raises:
        ValueError: nothing registered for it or its bases, naming the registered kinds.
    """
    for cls in (layer.__mro__ if isinstance(layer, type) else (layer,)):
        kind = _KINDS.find(_dotted(cls))
        if kind is not None:
            return kind
    raise ValueError(f"no layer kind registered for {_dotted(layer)!r}; registered: {list_layer_kinds()}. Add one "
                   "with lightning_masks.register_layer_kind")


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    """The kind of a module instance (its most specific registered class, else :func:`_fused_experts_kind`), or
    ``None``."""
    for cls in type(module).__mro__:
        kind = _KINDS.find(_dotted(cls))
        if kind is not None:
            return kind
    return _fused_experts_kind(module)


def _fused_experts_kind(module: nn.Module) -> Optional[LayerKind]:
    """The kind of transformers' fused experts (``@use_experts_implementation``: Mixtral, Qwen2-MoE, OLMoE, ...),
    or ``None`` for any other module.

    Such a module holds each projection of every expert in one 3-D tensor, ``(experts, out, in)`` or, with
    ``is_transposed``, ``(experts, in, out)``: those tensors are its weights, masked per expert (N:M groups run
    along each expert's inputs).
    """
    transposed = getattr(module, "is_transposed", None)
    if not isinstance(transposed, bool) or not hasattr(module, "has_gate"):
        return None
    names = tuple(name for name in own_tensor_names(module)
                  if (tensor := _own_tensor(module, name)) is not None and tensor.dim() == 3)
    return LayerKind(names, output_axis=2 if transposed else 1) if names else None


def _own_tensor(module: nn.Module, name: str) -> Optional[Tensor]:
    """``module.<name>``'s parameter (a parametrized one's ``original``), ``None`` for an empty slot."""
    if name in _parametrized_names(module):
        return parametrization_list(module, name).original
    return module._parameters[name]


def declared_axis(module: nn.Module, tensor_name: str) -> Optional[int]:
    """The axis of ``module.<tensor_name>`` that holds output units, as its layer kind declares it; ``None`` when no
    registered kind covers the tensor (then nothing says which axis that is)."""
    kind = kind_of(module)
    return kind.output_axis if kind is not None and tensor_name in kind.tensor_names(module) else None


def output_axis(module: nn.Module, tensor_name: str) -> int:
    """The axis of ``module.<tensor_name>`` that holds output units: the kind's for its weights, else 0 (only
    element masks, which need no axis, and 1-D tensors rely on that default; see :func:`undeclared_layout`)."""
    axis = declared_axis(module, tensor_name)
    return 0 if axis is None else axis


def undeclared_layout(name: str, owners: list[tuple[nn.Module, str]], shape: tuple[int, ...],
                      granularity: str) -> Optional[str]:
    """Why ``granularity`` (channel or N:M masks, which follow the output axis) cannot be put on the tensor ``name``
    of ``shape`` held by ``owners``: no registered kind of an owner declares its output axis; ``None`` when one does,
    or when the tensor has a single axis."""
    if len(shape) < 2 or any(declared_axis(module, tensor) is not None for module, tensor in owners):
        return None
    cls = type(owners[0][0])
    cls = cls.__bases__[0] if cls.__name__.startswith("Parametrized") else cls  # torch's class over a masked module
    return (f"granularity={granularity!r} needs to know which axis of {name!r} (shape {tuple(shape)}) holds its "
            f"output units, and {cls.__qualname__} is not a registered layer kind, so lightning_masks will not "
            f"guess: register it with lightning_masks.register_layer_kind({cls.__qualname__}, output_axis=0) if "
            "its weight is (out, in, ...) like nn.Linear's, output_axis=1 if (in, out) like GPT-2's Conv1D; or "
            f"leave it out with exclude=[{name!r}]; or use granularity='element', which needs no axis")


def bias_name(weight: str) -> Optional[str]:
    """The bias that channel masks gate with a weight: its name with ``weight`` replaced by ``bias``
    (``weight`` -> ``bias``, ``in_proj_weight`` -> ``in_proj_bias``, ``weight_ih_l0`` -> ``bias_ih_l0``); ``None``
    for a weight whose name has no ``weight`` in it. The one naming rule, also for folding a state dict."""
    return weight.replace("weight", "bias") if "weight" in weight else None


def weight_name(bias: str) -> str:
    """The inverse of :func:`bias_name`."""
    return bias.replace("bias", "weight")


def channel_shape(weight: Tensor, axis: int = 0) -> tuple[int, ...]:
    """The shape of per-output-channel scores for ``weight``: its size on ``axis``, 1 elsewhere."""
    return tuple(size if dim == axis else 1 for dim, size in enumerate(weight.shape))


_layer: type[nn.Module]
for _layer in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer_kind(_layer)
for _layer in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer_kind(_layer, output_axis=1)
register_layer_kind(nn.MultiheadAttention, tensors=("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                                    "v_proj_weight"))  # out_proj is an nn.Linear of its own
register_layer_kind(nn.RNNBase, tensors=("weight_ih_l*", "weight_hh_l*", "weight_hr_l*"))  # gates stacked on dim 0
register_layer_kind("transformers.pytorch_utils.Conv1D", output_axis=1)  # GPT-2's (in, out) weight


def parametrization_list(module: nn.Module, tensor_name: str) -> parametrize.ParametrizationList:
    """The parametrizations of ``module.<tensor_name>`` (which must be parametrized), with their ``original``."""
    return cast(parametrize.ParametrizationList, cast(nn.ModuleDict, module.parametrizations)[tensor_name])


def _parametrized_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s parametrized tensors (none when it has no parametrization)."""
    return list(cast(nn.ModuleDict, module.parametrizations)) if parametrize.is_parametrized(module) else []


def own_tensor_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s own parameter slots, its parametrized tensors under their user-facing names."""
    names = list(module._parameters)
    return names + [n for n in _parametrized_names(module) if n not in names]
