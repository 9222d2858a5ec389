"""What to mask: ``targets``/``exclude`` specs resolved on a model, and what is left dense and why."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Union, cast

from torch import Tensor, nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .adapters import adapter_tensors
from .gate import MaskGate
from .kinds import kind_of, output_axis, own_tensor_names, parametrization_list

__all__ = ["TargetSpec", "Targets", "resolve_targets"]


#: A target: a glob on fully-qualified module or tensor names, or a module type.
TargetSpec = Union[str, type]


def tensor_slots(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, str, Tensor]]:
    """Yield ``(qualified_name, module_name, module, tensor_name, parameter)`` for every parameter slot.

    Shared modules and tied parameters are yielded once per place they appear. A parametrized tensor
    is yielded under its user-facing name with its ``original`` parameter.
    """
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (parametrize.ParametrizationList, MaskGate)):
            continue
        for tensor_name in own_tensor_names(module):
            if parametrize.is_parametrized(module, tensor_name):
                tensor = getattr(parametrization_list(module, tensor_name), "original", None)  # None: several originals
            else:
                tensor = module._parameters[tensor_name]
            if tensor is None:
                continue
            qualified = f"{module_name}.{tensor_name}" if module_name else tensor_name
            yield qualified, module_name, module, tensor_name, tensor


def _weight_names(module: nn.Module) -> list[str]:
    """The tensors a module glob or type selects: its layer kind's weights, else its own parameters named
    ``*weight*`` (a LayerNorm's or an Embedding's ``weight``)."""
    kind = kind_of(module)
    if kind is not None:
        return kind.tensor_names(module)
    return [name for name in own_tensor_names(module) if "weight" in name]


def _foreign_reason(module: nn.Module) -> str | None:
    """Why a module cannot take a mask: its weight is already computed by something else."""
    hooks = (prune.BasePruningMethod, WeightNorm, SpectralNorm)
    if any(isinstance(hook, hooks) for hook in module._forward_pre_hooks.values()):
        return "already pruned or normalised through a forward pre-hook (torch.nn.utils.prune / weight_norm / " \
               "spectral_norm); call torch.nn.utils.prune.remove(module, 'weight') or remove the norm first"
    for name in _weight_names(module):
        if parametrize.is_parametrized(module, name):
            others = [type(p).__name__ for p in parametrization_list(module, name) if not isinstance(p, MaskGate)]
            if others:
                return (f"already parametrized by {others} on {name!r}; remove it first with "
                        f"torch.nn.utils.parametrize.remove_parametrizations(module, {name!r})")
    return None


def is_masked(module: nn.Module, tensor_name: str) -> bool:
    return parametrize.is_parametrized(module, tensor_name) and any(
        isinstance(p, MaskGate) for p in parametrization_list(module, tensor_name)
    )


def _no_match_error(role: str, pattern: TargetSpec, candidates: Sequence[str]) -> ValueError:
    shown = difflib.get_close_matches(str(pattern), candidates, n=8, cutoff=0.3) or list(candidates[:8])
    return ValueError(
        f"{role} pattern {pattern!r} matches no module or tensor of the model; candidates include "
        f"{shown}. Fix the pattern (globs match fully-qualified names such as 'encoder.0.weight') or pass a type"
    )


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def _looks_embedded(name: str) -> bool:
    """A raw parameter named like an embedding (ViT's ``cls_token``, ``position_embeddings``): left dense quietly."""
    last = name.split(" = ")[0].rpartition(".")[2].lower()
    return any(word in last for word in ("embed", "token", "position"))


def _expert_count(experts: nn.Module) -> int:
    """The number of experts an MoE block's ``experts`` module holds: its ``num_experts``, else its submodules with
    weights (a ModuleList or ModuleDict of MLPs), else the first axis of its fused 3-D tensors."""
    count = getattr(experts, "num_experts", None)
    if isinstance(count, int):
        return count
    children = [child for child in experts.children() if any(True for _ in child.parameters())]
    if children:
        return len(children)
    fused = [tensor for tensor in experts.parameters() if tensor.dim() == 3]
    return fused[0].shape[0] if fused else 0


def routers(model: nn.Module) -> set[int]:
    """The ids of the routing weights of every mixture-of-experts block in ``model``.

    An MoE block is a module with a child named ``experts`` (transformers' Mixtral, Qwen2-MoE, Switch, OLMoE,
    DeepSeek, ...). Its routers are its weight matrices outside the experts whose outputs are one logit per expert
    (Switch's ``router.classifier``, Mixtral's and Qwen2-MoE's ``gate``) or a single gate (Qwen2-MoE's
    ``shared_expert_gate``): pruning them changes which experts run, so they are left dense like embeddings.
    """
    found: set[int] = set()
    for block in model.modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.Module) or experts not in block.children():
            continue
        count = _expert_count(experts)
        inside = {id(tensor) for tensor in experts.parameters()}
        for module in block.modules():
            for tensor_name, tensor in module.named_parameters(recurse=False):
                if id(tensor) in inside or tensor.dim() != 2:
                    continue
                outputs = tensor.shape[output_axis(module, tensor_name)]
                if outputs in (count, 1):
                    found.add(id(tensor))
    return found


def _is_foreign(module: nn.Module) -> bool:
    return _foreign_reason(module) is not None


@dataclass
class Targets:
    """What a target/exclude spec resolves to on one model (see :func:`resolve_targets`).

    ``chosen`` maps the first qualified name of each tensor to mask to every ``(module, tensor_name)`` that
    shares it. The name lists say what was left out and why: ``embeddings`` (tables, and tensors tied to one,
    left out by default), ``frozen`` (``requires_grad=False``, left out unless ``mask_frozen``), ``excluded`` (by
    ``exclude``) and ``unmasked`` (every other trainable weight matrix: no registered layer kind, not targeted). Tied
    names are joined by ``" = "``. ``routers``: the routing weights of mixture-of-experts blocks (:func:`routers`),
    left out by default like embeddings. ``adapters``: the PEFT adapters' own tensors (LoRA factors), left out unless a
    glob names them. With explicit ``targets``, the trainable matrices they leave out are ``untargeted`` instead of
    ``unmasked``. ``foreign`` names the layers left dense by default because something else already computes
    their weight (weight_norm, spectral_norm, torch.nn.utils.prune), with why. ``named``: the chosen tensors a
    name glob in ``targets`` selected (not only a type). ``frozen_chosen``: the chosen tensors that were frozen
    (``mask_frozen=True``).
    """

    chosen: dict[str, list[tuple[nn.Module, str]]]
    embeddings: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    unmasked: list[str] = field(default_factory=list)
    untargeted: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    named: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    frozen_chosen: list[str] = field(default_factory=list)


def resolve_targets(
    model: nn.Module,
    targets: Iterable[TargetSpec] | None = None,
    exclude: Iterable[TargetSpec] = (),
    *,
    mask_frozen: bool = False,
) -> Targets:
    """Resolve ``targets`` and ``exclude`` on ``model``: the tensors to mask, and what is left dense and why.

    A spec is, in this order:

    * a module type: its instances' weights (their layer kind's, see :mod:`lightning_masks.masking.kinds`, else
      their parameters named ``*weight*``);
    * a glob on qualified module names: the weights of the matched modules that have a layer kind or, when
      none has, of every matched module whatever its type (``"transformer.wte"`` selects the embedding's
      ``weight``);
    * a glob on qualified tensor names (``"lm_head.weight"``, ``"*.bias"``): those tensors.

    ``None`` selects the weights of every registered layer kind
    (:func:`~lightning_masks.masking.kinds.list_layer_kinds`) except embedding tables and the tensors tied to one (a
    tied LM head), and the routers and gates of mixture-of-experts blocks (:func:`routers`): those are masked only when
    a name glob (or, for tables, an embedding type) selects them. In a PEFT model (one holding peft tuner layers) the
    frozen weights are the base model's: they are masked like trainable ones (their scores train), and the adapters'
    own tensors are left out unless a name glob selects them. ``exclude`` specs resolve the same way and are removed.
    Frozen (``requires_grad=False``) tensors are skipped unless ``mask_frozen``; lazy and already-masked ones
    always. A parameter shared by several
    modules (tied weights) is one entry with several owners.

    Raises:
        ValueError: a target or exclude pattern that matches nothing, naming candidates; a selected module
            whose weight is already pruned, normalised or parametrized by something else.
        TypeError: a spec that is neither a string nor a module type.
    """
    slots = list(tensor_slots(model))
    modules = list(model.named_modules())
    by_param: dict[int, list[tuple[str, nn.Module, str]]] = {}
    tensors: dict[int, Tensor] = {}
    for qualified, _, module, tensor_name, tensor in slots:
        by_param.setdefault(id(tensor), []).append((qualified, module, tensor_name))
        tensors[id(tensor)] = tensor

    def tensors_of(selected: Iterable[nn.Module]) -> set[int]:
        picked = {id(m): set(_weight_names(m)) for m in selected}
        return {id(t) for _, _, m, tn, t in slots if tn in picked.get(id(m), ())}

    def resolve(spec: TargetSpec, role: str) -> tuple[set[int], bool]:
        """The tensors ``spec`` selects, and whether it names them explicitly (embeddings included)."""
        if isinstance(spec, type):
            selected = (cast(nn.Module, m) for _, m in modules if isinstance(m, spec))  # isinstance narrows to object
            return tensors_of(selected), issubclass(spec, nn.Embedding)
        if not isinstance(spec, str):
            raise TypeError(f"{role} must be a glob string or a module type, got {spec!r}")
        matched = [m for name, m in modules if fnmatch.fnmatchcase(name, spec)]
        layers = [m for m in matched if kind_of(m) is not None]
        hits = tensors_of(layers or matched)
        if not hits:
            hits = {id(t) for q, _, _, _, t in slots if fnmatch.fnmatchcase(q, spec)}
        if not hits and not matched:
            raise _no_match_error(role, spec, [q for q, *_ in slots])
        return hits, True

    def select(specs: Iterable[TargetSpec], role: str) -> tuple[set[int], set[int], set[int]]:
        """The tensors ``specs`` select, those named explicitly (embeddings included), those named by a glob."""
        chosen: set[int] = set()
        explicit: set[int] = set()
        globbed: set[int] = set()
        for spec in specs:
            hits, named = resolve(spec, role)
            chosen |= hits
            if named:
                explicit |= hits
            if isinstance(spec, str):
                globbed |= hits
        return chosen, explicit, globbed

    embedded = {key for key, owners in by_param.items() if any(_is_embedding(m) for _, m, _ in owners)}
    routing = routers(model)
    adapters = adapter_tensors(model)  # None: no PEFT adapters
    targets = None if targets is None else list(targets)
    exclude = list(exclude)
    if targets is None:
        wanted = tensors_of(m for _, m in modules if kind_of(m) is not None)
        explicit, globbed = set[int](), set[int]()
    else:
        wanted, explicit, globbed = select(targets, "target")
    excluded, _, _ = select(exclude, "exclude")
    result = Targets({})
    for name, module, reason in _foreign_layers(model, wanted - excluded, by_param, targets, exclude):
        if targets is not None:  # named: refuse; by default: leave it dense and say so
            raise ValueError(f"{type(module).__name__} {name!r} is {reason}; or leave it unmasked with "
                             f"exclude=[{name!r}]")
        wanted -= {id(t) for _, _, m, _, t in slots if m is module}
        result.foreign.append(f"{name} ({reason.split(';')[0]})")
    for key, owners in by_param.items():
        tensor = tensors[key]
        name = " = ".join(q for q, _, _ in owners)
        matrix = tensor.dim() >= 2 and not isinstance(tensor, nn.parameter.UninitializedParameter)
        if any(is_masked(m, tn) for _, m, tn in owners):
            continue
        if key in excluded:
            if matrix:
                result.excluded.append(name)
        elif not tensor.requires_grad and not (adapters is not None and key in wanted) and not (
                mask_frozen and key in wanted and key not in embedded - explicit):
            if matrix or key in wanted:
                result.frozen.append(name)
        elif adapters is not None and key in adapters and key not in globbed:
            if matrix:
                result.adapters.append(name)
        elif key in embedded and key not in explicit:
            if key in wanted or matrix:
                result.embeddings.append(name)
        elif key in routing and key not in globbed:
            result.routers.append(name)
        elif key in wanted and not isinstance(tensor, nn.parameter.UninitializedParameter):
            result.chosen[owners[0][0]] = [(m, tn) for _, m, tn in owners]
            if not tensor.requires_grad:
                result.frozen_chosen.append(owners[0][0])
            if key in globbed:
                result.named.append(owners[0][0])
        elif matrix and targets is not None:
            result.untargeted.append(name)
        elif matrix and not any(_is_foreign(m) for _, m, _ in owners):
            (result.embeddings if _looks_embedded(name) else result.unmasked).append(name)
    return result


def find_targets(
    model: nn.Module,
    targets: Iterable[TargetSpec] | None = None,
    exclude: Iterable[TargetSpec] = (),
) -> dict[str, list[tuple[nn.Module, str]]]:
    """Return the tensors to mask, keyed by the first qualified name of each, with every owner.

    See :func:`resolve_targets` for the rules; this is its ``chosen``.
    """
    return resolve_targets(model, targets, exclude).chosen


def _foreign_layers(model: nn.Module, selected: set[int], by_param: dict[int, list],
                    targets: list[TargetSpec] | None, exclude: list[TargetSpec]) -> list[tuple[str, nn.Module, str]]:
    """The ``(name, module, reason)`` of each layer that would be masked but already has its weight computed by a
    hook or another parametrization (weight_norm, spectral_norm, torch.nn.utils.prune).

    Checked: the owners of the ``selected`` tensors, and the targeted layers whose weight a pruning hook renamed
    (``weight_orig``), which no spec can select any more.
    """

    def matched(specs: list[TargetSpec], name: str, module: nn.Module) -> bool:
        return any(isinstance(module, s) if isinstance(s, type) else fnmatch.fnmatchcase(name, s) for s in specs)

    owners = {id(m) for key in selected for _, m, _ in by_param.get(key, ())}
    found = []
    for name, module in model.named_modules():
        targeted = kind_of(module) is not None if targets is None else matched(targets, name, module)
        if id(module) not in owners and (not targeted or matched(exclude, name, module)):
            continue
        reason = _foreign_reason(module)
        if reason:
            found.append((name, module, reason))
    return found


def nothing_to_mask(resolved: Targets, targets: list[TargetSpec] | None) -> str:
    """The error for a selection that masks nothing: what was asked, what was left out and why, the fix."""
    if targets is None:
        asked = ("the model has no trainable weight of a registered layer kind (lightning_masks.masking.kinds."
                 "list_layer_kinds(): Linear, ConvNd, ConvTransposeNd, MultiheadAttention, RNN/LSTM/GRU, "
                 "transformers' Conv1D)")
    else:
        asked = f"targets={targets!r} select no trainable, unmasked tensor"
    reasons = [f"{label} {names[:6]}" for label, names in (
        ("embedding tables (mask them by naming them in targets):", resolved.embeddings),
        ("MoE routers and gates (mask them by naming them in targets):", resolved.routers),
        ("PEFT adapter factors (mask them by naming them in targets):", resolved.adapters),
        ("frozen (requires_grad=False):", resolved.frozen), ("excluded:", resolved.excluded),
        ("already computed by another parametrization or hook:", resolved.foreign),
        ("of no registered layer kind:", resolved.unmasked), ("not in targets:", resolved.untargeted)) if names]
    left = f"; left out: {'; '.join(reasons)}" if reasons else ""
    return (f"no maskable tensor found: {asked}{left}. Pass `targets` naming the tensors to mask (globs on module "
            "or tensor names, or module types), or register your layer with lightning_masks.register_layer_kind")
