"""LLM workflows: activation-aware (Wanda) scores, starting from a one-shot pruner's zeros, MoE routers left whole,
PEFT/LoRA adapters over masked base weights. Tiny transformers configs, random weights."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer, synthetic_loader
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_masks import (
    MaskLogging,
    MaskOptimizer,
    MaskPruningCallback,
    Schedule,
    Selector,
    attach,
    fold,
    get_initializer,
    masked_tensors,
    register_layer_kind,
)


class Snapshot(Callback):
    """The scores and keep bits as training starts (after any data-dependent initialisation, before any update)."""

    def __init__(self) -> None:
        self.scores, self.keep, self.norms = [], [], []

    def on_train_start(self, trainer, pl_module):
        if not self.scores:
            self.scores = [e.gate.scores.detach().float().clone() for e in masked_tensors(pl_module)]
            self.keep = [e.gate.keep.clone() for e in masked_tensors(pl_module)]
            self.norms = [e.gate.input_norm for e in masked_tensors(pl_module)]


def one_shot(module: nn.Module, sparsity: float = 0.5) -> dict[str, torch.Tensor]:
    """Zero the smallest weights of each Linear in place, as a one-shot pruner leaves them; return the zeros."""
    zeros = {}
    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, nn.Linear):
                cut = layer.weight.abs().flatten().kthvalue(int(sparsity * layer.weight.numel())).values
                layer.weight[layer.weight.abs() <= cut] = 0.0
                zeros[name] = layer.weight == 0
    return zeros


# ----------------------------------------------------------------------------------------- wanda
def test_wanda_gates_keep_the_dense_networks_input_rms_over_the_first_batches():
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    dense = TinyModule()
    dense.load_state_dict(module.state_dict())
    inputs = torch.cat([x for x, _ in list(synthetic_loader())[:2]])
    hidden = dense.net[1](dense.net[0](inputs)).detach()
    expected = [inputs.square().mean(0).sqrt(), hidden.square().mean(0).sqrt()]
    snapshot = Snapshot()
    make_trainer(max_steps=1, callbacks=[MaskPruningCallback(init=get_initializer("wanda", batches=2)),
                                         snapshot]).fit(module)
    for got, want in zip(snapshot.norms, expected):
        torch.testing.assert_close(got, want.detach().view(1, -1))
    for got, layer in zip(snapshot.scores, (dense.net[0], dense.net[2])):  # the scores start as magnitude's
        assert torch.equal(got, layer.weight.detach().abs().to(torch.bfloat16).float())


# ----------------------------------------------------------------------------------------- one-shot zeros
def test_from_zeros_starts_from_a_one_shot_mask_that_training_weights_do_not_refill():
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    zeros = one_shot(module, 0.5)
    snapshot = Snapshot()
    make_trainer(max_epochs=3, callbacks=[MaskPruningCallback(sparsity=0.7, init="from_zeros"), snapshot]).fit(module)
    assert [(~keep).sum().item() for keep in snapshot.keep] == [z.sum().item() for z in zeros.values()]
    for name, zero in zeros.items():  # the one-shot zeros stayed zero; the masks pruned on from there to 70%
        weight = module.get_submodule(name).weight
        assert torch.all(weight[zero] == 0)
    pruned = sum((module.get_submodule(n).weight == 0).sum().item() for n in zeros)
    assert pruned == round(0.7 * sum(z.numel() for z in zeros.values()))


@pytest.mark.parametrize("granularity", ["element", "2:4"])
def test_from_zeros_fixed_holds_the_one_shot_mask_while_the_kept_weights_train(granularity):
    pl.seed_everything(0, verbose=False)
    module = TinyModule()
    if granularity == "2:4":
        with torch.no_grad():
            for layer in (module.net[0], module.net[2]):
                groups = layer.weight.view(-1, 4)
                groups.scatter_(1, groups.abs().topk(2, dim=1, largest=False).indices, 0.0)
        zeros = {n: module.get_submodule(n).weight == 0 for n in ("net.0", "net.2")}
    else:
        zeros = one_shot(module, 0.6)
    before = {n: module.get_submodule(n).weight.detach().clone() for n in zeros}
    pruner = MaskPruningCallback(init=get_initializer("from_zeros", fixed=True),
                                 selector=Selector(granularity=granularity))
    make_trainer(max_epochs=2, callbacks=[pruner]).fit(module)
    for name, zero in zeros.items():
        weight = module.get_submodule(name).weight
        assert torch.equal(weight == 0, zero)  # the same zeros, no more
        assert not torch.equal(weight, before[name])  # the kept weights trained
    assert pruner.plan.pruned == sum(z.sum().item() for z in zeros.values())  # what the fit reports as pruned


# ----------------------------------------------------------------------------------------- mixture of experts
def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                            num_experts_per_tok=2, max_position_embeddings=32))


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                              moe_intermediate_size=8, shared_expert_intermediate_size=16,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=32))


def switch():
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
    torch.manual_seed(0)
    return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2, num_experts=4,
        encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=64, decoder_start_token_id=0, pad_token_id=0))


VOCAB = 64
MOE = {  # model, its routing weights, its expert weights
    "mixtral": (mixtral, ["*.mlp.gate.weight"], ["*.mlp.experts.gate_up_proj", "*.mlp.experts.down_proj"]),
    "qwen2_moe": (qwen2_moe, ["*.mlp.gate.weight", "*.mlp.shared_expert_gate.weight"],
                  ["*.mlp.experts.gate_up_proj", "*.mlp.experts.down_proj", "*.shared_expert.*_proj.weight"]),
    "switch": (switch, ["*.mlp.router.classifier.weight"], ["*.mlp.experts.expert_*.w?.weight"]),
}


class LM(pl.LightningModule):
    """A transformers model in a LightningModule, as a user writes it: its own loss on random token batches."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        return self.model(input_ids=tokens, labels=tokens).loss

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (16, 12), generator=generator)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def matching(model: nn.Module, globs: list[str]) -> set[str]:
    import fnmatch
    return {n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, g) for g in globs)}


@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_routers_stay_dense_and_named_while_every_expert_is_pruned(family, caplog, monkeypatch):
    build, router_globs, expert_globs = MOE[family]
    module = LM(build())
    routing = {"model." + n for n in matching(module.model, router_globs)}
    experts = {"model." + n for n in matching(module.model, expert_globs)}
    assert routing and experts
    before = {n: p.detach().clone() for n, p in module.named_parameters() if n in routing}
    pruner = MaskPruningCallback(sparsity=0.9, fold_on_fit_end=False, logging=MaskLogging(plots=False))
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    make_trainer(max_epochs=1, limit_train_batches=3, callbacks=[pruner]).fit(module)
    masked = {e.name: e for e in masked_tensors(module)}
    assert not routing & set(masked)
    assert experts <= set(masked)
    line = next(r.getMessage() for r in caplog.records if "lightning_masks: masking" in r.getMessage())
    assert "routers and gates left dense" in line and router_globs[0].split(".")[-2] in line
    params = dict(module.named_parameters())
    assert all(torch.count_nonzero(params[n]) == params[n].numel() for n in before)
    for name in experts:  # each expert of a fused tensor is pruned, not whole experts
        keep = masked[name].gate.keep
        per_expert = (~keep).reshape(keep.shape[0], -1).float().mean(1) if keep.dim() == 3 else (~keep).float().mean()
        assert torch.all(per_expert > 0.5), name


def test_fused_experts_take_2_4_along_each_experts_inputs_and_a_glob_masks_a_router():
    module = LM(mixtral())
    router = type(module.model.model.layers[0].mlp.gate)  # no registered kind: N:M needs its axis named
    register_layer_kind(router, output_axis=0)
    pruner = MaskPruningCallback(selector=Selector(granularity="2:4"), targets=["*.mlp.experts", "*.layers.0.mlp.gate"])
    make_trainer(max_epochs=1, limit_train_batches=1, callbacks=[pruner]).fit(module)
    experts = module.model.model.layers[0].mlp.experts
    for weight in (experts.gate_up_proj, experts.down_proj):  # (experts, out, in): groups of 4 inputs, 2 kept
        assert torch.all((weight.reshape(-1, 4) != 0).sum(1) <= 2)
    assert (module.model.model.layers[0].mlp.gate.weight == 0).float().mean() == 0.5
    assert torch.count_nonzero(module.model.model.layers[1].mlp.gate.weight) == 4 * 16


# ----------------------------------------------------------------------------------------- PEFT / LoRA
def llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=tie))


def lora(model, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=dropout))


def logits(module: LM, tokens: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module.model(input_ids=tokens).logits


def test_lora_prunes_the_frozen_base_under_the_adapters_and_merge_and_unload_keeps_the_zeros():
    module = LM(lora(llama()), lr=1e-2)
    base = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad and p.dim() == 2}
    factors = {n for n, p in module.named_parameters() if "lora_" in n}
    pruner = MaskPruningCallback(sparsity=0.5, fold_on_fit_end=False, logging=MaskLogging(plots=False))
    snapshot = Snapshot()
    make_trainer(max_epochs=2, callbacks=[pruner, snapshot]).fit(module)
    masked = {e.name: e for e in masked_tensors(module)}
    assert not factors & set(masked)  # the LoRA factors stay dense
    assert {n for n in base if "embed" not in n} == set(masked)  # every frozen base matrix, adapted or not
    assert all(torch.equal(masked[n].weight, base[n]) for n in masked)  # the base stayed frozen
    for start, entry in zip(snapshot.scores, masked.values()):  # the scores trained
        kept = entry.gate.keep
        assert entry.gate.scores.requires_grad and not torch.equal(entry.gate.scores.float()[kept], start[kept])
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    trained = logits(module, tokens)

    from lightning_masks import fold
    fold(module)
    assert torch.allclose(logits(module, tokens), trained, atol=1e-5)  # the function it trained, folded
    merged = module.model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    matrices = [p for n, p in merged.named_parameters() if p.dim() == 2 and "embed" not in n]
    assert sum(p.numel() for p in matrices) == sum(e.numel for e in masked.values())
    assert sum((p == 0).sum().item() for p in matrices) == round(0.5 * sum(p.numel() for p in matrices))
    merged.eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=tokens).logits, trained, atol=1e-5)


@pytest.mark.parametrize("gate_kind", ["soft", "binary", "relaxed"])
def test_a_masked_lora_layer_computes_the_adapters_update_under_the_same_mask(gate_kind):
    """Soft gates, binary masks (frozen="mask") and a relaxation's sampled patterns (in training: the very sample
    the base weight drew) mask the adapter's update as they mask the base weight, so the layer computes
    ``x ((W + dW) * G)^T``, what the fold leaves."""
    from lightning_masks import GumbelPatterns, attach
    from lightning_masks.masking.patterns import RelaxedGroups
    model = lora(llama())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # a nonzero update (peft starts B at zero)
    binary = [] if gate_kind == "soft" else [f"base_model.model.model.layers.{i}.self_attn.q_proj.base_layer.weight"
                                             for i in range(2)]
    attach(model, ["*.q_proj.base_layer"], init=lambda w: torch.randn_like(w), binary=binary)
    entry = masked_tensors(model)[0]
    gate = entry.gate
    assert gate.is_binary == bool(binary)
    if gate_kind == "relaxed":
        gate.relaxation = RelaxedGroups(GumbelPatterns(), 2, 4, axis=0)
    with torch.no_grad():
        gate.set_keep(torch.rand_like(entry.weight) > 0.5)
    x = torch.randn(3, 16)
    delta = layer.get_delta_weight("default").detach()
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)  # the same Gumbel noise: the sample the layer's forward drew
    expected = x @ gate.masked(entry.weight + delta).T
    assert torch.allclose(out, expected, atol=1e-5)
    if gate_kind != "relaxed":
        mask = gate.keep if binary else gate(torch.ones_like(delta))
        assert torch.allclose(out, x @ ((entry.weight + delta) * mask).T, atol=1e-5)
    model.eval()  # outside training every kind is the fold's: binary masks are w * keep
    with torch.no_grad():
        want = x @ gate.folded(entry.weight + delta).T
        assert torch.allclose(layer(x), want, atol=1e-5)


# ----------------------------------------------------------------------------------------- the README's examples
def readme_block(marker: str) -> str:
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, f"README lost its {marker} block"
    return match.group(1)


def test_the_readme_llm_and_lora_examples_save_pretrained_models_with_exact_zeros(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(readme_block("llm-example"), namespace)
    saved = load_file(tmp_path / "pruned" / "model.safetensors")
    decoder = {n: w for n, w in saved.items() if ".layers." in n and w.dim() == 2}
    assert len(decoder) == 2 * 7
    for weight in decoder.values():  # exact 2:4: every group of 4 inputs keeps 2
        assert torch.all((weight.reshape(-1, 4) != 0).sum(1) == 2)
    assert all(torch.count_nonzero(saved[n]) == saved[n].numel() for n in saved if "embed" in n or "lm_head" in n)

    exec(readme_block("lora-example"), namespace)
    merged = load_file(tmp_path / "pruned_merged" / "model.safetensors")
    assert not any("lora" in n for n in merged)
    matrices = {n: w for n, w in merged.items() if w.dim() == 2 and "embed" not in n}
    assert set(matrices) == set(decoder) | {"lm_head.weight"}
    for name, weight in matrices.items():  # 50% of each base Linear, the adapters' update merged under the mask
        assert (weight == 0).sum().item() == weight.numel() // 2, name


@pytest.mark.parametrize("marker", ["llm-swaps-example", "llm-gumbel-example"])
def test_the_readme_learned_2_4_examples_keep_exact_2_4_masks_over_the_frozen_weights_bit_for_bit(marker):
    from transformers import AutoModelForCausalLM
    namespace: dict = {}
    exec(readme_block("llm-example").split("pl.Trainer(")[0], namespace)  # the LM, the model's config, the data
    torch.manual_seed(0)
    exec(readme_block(marker), namespace)
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(namespace["model"].config)
    pruned = dict(namespace["model"].named_parameters())
    decoder = [n for n, w in original.named_parameters() if ".layers." in n and w.dim() == 2]
    assert len(decoder) == 2 * 7
    for name in decoder:
        weight, before = pruned[name].detach(), dict(original.named_parameters())[name].detach()
        assert torch.all((weight.reshape(-1, 4) != 0).sum(1) == 2), name  # exact 2:4
        kept = weight != 0
        assert torch.equal(weight[kept], before[kept]), name  # frozen="mask": the kept weights bit for bit


class OutlierFeatures(pl.LightningModule):
    """A Linear whose input features differ in scale by up to 1000x (an LLM's outlier features): Wanda's mask
    (|w_ij| * ||x_j||) and magnitude's part ways. Its weights train at lr 0, so the masks alone decide."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.layer = nn.Linear(16, 8)
        self.inputs = torch.randn(128, 16, generator=generator) * torch.logspace(-1.5, 1.5, 16)
        self.targets = torch.randn(128, 8, generator=generator)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.inputs, self.targets), batch_size=16)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("mode", ["global", "row"])
def test_wanda_initialised_masks_prune_by_wandas_criterion_not_magnitudes(mode):
    """init='wanda' ranks |w * gate| * ||x_j|| for the whole fit (the gate keeps the input norms): with the scores
    held (lr 0) the final mask is Wanda's score of the effective weight, per layer or per output row, though
    magnitude's mask differs. The gates start at sigmoid(|w|) (bfloat16 scores), as magnitude's do."""
    pl.seed_everything(0, verbose=False)
    module = OutlierFeatures()
    weight = module.layer.weight.detach().clone()
    gate = torch.sigmoid(weight.abs().to(torch.bfloat16).float())
    wanda = weight.abs() * gate * module.inputs.square().mean(0).sqrt()  # 8 batches of 16: all rows calibrate
    callback = MaskPruningCallback(0.5, init="wanda", selector=Selector(mode=mode), optimizer=MaskOptimizer(lr=0.0),
                                   schedule=Schedule("linear", start=0, end=1.0, update_every=2))
    make_trainer(max_epochs=2, callbacks=[callback]).fit(module)
    kept = module.layer.weight != 0

    def top_half(values):
        if mode == "row":
            return torch.zeros_like(values, dtype=torch.bool).scatter_(1, values.topk(8, dim=1).indices, True)
        return torch.zeros(values.numel(), dtype=torch.bool).scatter_(0, values.flatten().topk(64).indices,
                                                                      True).view_as(values)

    assert torch.equal(kept, top_half(wanda))
    assert (kept != top_half(weight.abs())).sum() > 20  # magnitude's mask is another one


def test_the_input_norms_travel_with_the_masks_state_dict():
    from lightning_masks.masking import restore_masks_on_load

    layer = nn.Linear(6, 4)
    (entry,) = attach(layer)
    entry.gate.set_input_norm(torch.arange(1.0, 7.0).view(1, 6))
    state = layer.state_dict()
    assert torch.equal(state["parametrizations.weight.0.input_norm"], torch.arange(1.0, 7.0).view(1, 6))
    fresh = nn.Linear(6, 4)
    restore_masks_on_load(fresh)
    fresh.load_state_dict(state)
    (restored,) = masked_tensors(fresh)
    assert torch.equal(restored.gate.input_norm, entry.gate.input_norm)
    fold(fresh)
    assert set(fresh.state_dict()) == {"weight", "bias"}


class BatchLog(Callback):
    """The training batches a fit trains on, in order."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[0].clone())


class ShuffledTiny(TinyModule):
    def train_dataloader(self):
        loader = synthetic_loader(features=self.hparams.features, classes=self.hparams.classes)
        return torch.utils.data.DataLoader(loader.dataset, batch_size=16, shuffle=True)


@pytest.mark.parametrize("init", ["wanda", "snip"])
def test_calibration_batches_leave_the_fits_data_order_as_it_was(init):
    """An initializer that reads training batches (Wanda's norms, SNIP's gradient) draws them from the shuffled
    loader: the global RNG is restored after, so a seeded fit trains on the batches magnitude's fit trains on."""
    orders = {}
    for name in ("magnitude", init):
        pl.seed_everything(0, verbose=False)
        log = BatchLog()
        make_trainer(max_epochs=2, callbacks=[MaskPruningCallback(init=name), log]).fit(ShuffledTiny())
        orders[name] = log.batches
    assert len(orders["magnitude"]) == 8
    assert all(torch.equal(a, b) for a, b in zip(orders["magnitude"], orders[init]))
