"""Export: sparse save (bit-exact, small), physical shrink of zero channels, the command, plain-PyTorch loading."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, make_trainer
from torch import nn

from lightning_masks import MaskPruningCallback, Schedule, attach, fold_checkpoint, fold_state_dict
from lightning_masks.export import save_sparse
from lightning_masks.export.checkpoints import load_checkpoint
from lightning_masks.export.command import main, save_program
from lightning_masks.export.shrink import shrink
from lightning_masks.export.sparse_file import load_sparse

README = Path(__file__).resolve().parents[1] / "README.md"


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so comparisons see -0.0 and NaN payloads."""
    return tensor.contiguous().view(torch.uint8) if tensor.dim() else tensor.reshape(1).view(torch.uint8)


def assert_bit_equal(expected: dict, actual: dict) -> None:
    assert sorted(expected) == sorted(actual)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and actual[key].shape == tensor.shape, key
        assert torch.equal(bits(actual[key]), bits(tensor)), key


def prune_elements(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude ``sparsity`` share of every weight matrix; return the state dict."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                weight = module.weight
                cut = weight.abs().flatten().kthvalue(int(sparsity * weight.numel())).values
                weight[weight.abs() <= cut] = 0
    return model.state_dict()


def lenet300() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def odd_state_dict() -> dict[str, torch.Tensor]:
    weight = torch.randn(40, 33)
    weight[torch.rand(40, 33) < 0.9] = 0
    weight[0, :3] = torch.tensor([-0.0, float("nan"), float("-inf")])
    return {"w": weight, "half": weight.half(), "bf": weight.bfloat16(), "double": weight.double(),
            "steps": torch.tensor(7), "ints": torch.tensor([0, 0, 0, 5] * 20), "flags": torch.rand(50) < 0.01,
            "dense": torch.randn(5), "empty": torch.zeros(0, 3), "scalar": torch.tensor(-0.0)}


def test_sparse_round_trip_is_bit_exact(tmp_path):
    state = odd_state_dict()
    info = save_sparse(state, tmp_path / "m.safetensors")
    assert info.sparse_tensors >= 4  # the mostly-zero float tensors and ints went sparse
    assert_bit_equal(state, load_sparse(info.path))


def test_sparse_file_is_at_most_0_15_of_dense_at_95_percent(tmp_path):
    model = lenet300()
    state = prune_elements(model, 0.95)
    assert sum(p.numel() for p in model.parameters()) > 200_000
    info = save_sparse(state, tmp_path / "m.safetensors")
    assert info.sparse_bytes == info.path.stat().st_size
    assert info.ratio <= 0.15, info.ratio
    restored = lenet300()
    restored.load_state_dict(load_sparse(info.path))
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(restored(x), model(x))


def test_dense_model_is_not_made_larger(tmp_path):
    state = lenet300().state_dict()
    info = save_sparse(state, tmp_path / "m.safetensors")
    assert info.sparse_tensors == 0 and info.ratio < 1.01


def test_bad_input_and_files_get_clear_errors_and_keep_the_destination(tmp_path):
    destination = tmp_path / "m.safetensors"
    destination.write_bytes(b"what the user had")
    with pytest.raises(ValueError, match=r"'extra' is a str, not a tensor"):
        save_sparse({"w": torch.zeros(3), "extra": "x"}, destination)
    with pytest.raises(ValueError, match=r"'a::b' contains '::'"):
        save_sparse({"a::b": torch.zeros(3)}, destination)
    assert destination.read_bytes() == b"what the user had"
    with pytest.raises(ValueError, match=r"could not read sparse file .*m.safetensors"):
        load_sparse(destination)
    with pytest.raises(ValueError, match=r"'.*nope.safetensors' does not exist"):
        load_sparse(tmp_path / "nope.safetensors")
    assert list(tmp_path.glob("*.tmp")) == []


def readme_loader() -> str:
    """The plain-PyTorch loader documented in the README (the code block after ``<!-- plain-loader -->``)."""
    match = re.search(r"<!-- plain-loader -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README lost its plain-loader block"
    return match.group(1)


def run_plain(code: str) -> str:
    """Run ``code`` in a fresh interpreter and fail if it imported lightning_masks."""
    check = "\nimport sys\nassert not any(m.startswith('lightning_masks') for m in sys.modules), 'imported'\n"
    done = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_readme_loader_restores_the_exact_state_dict_without_lightning_masks(tmp_path):
    state = odd_state_dict()
    save_sparse(state, tmp_path / "m.safetensors")
    torch.save(state, tmp_path / "expected.pt")
    run_plain(readme_loader() + f"""
expected, actual = torch.load({str(tmp_path / 'expected.pt')!r}), load_sparse({str(tmp_path / 'm.safetensors')!r})
assert sorted(expected) == sorted(actual)
raw = lambda t: t.reshape(-1).contiguous().view(torch.uint8)
assert all(torch.equal(raw(expected[k]), raw(actual[k])) and expected[k].shape == actual[k].shape for k in expected)
""")


# --- shrink ------------------------------------------------------------------------------------------------------

class ConvNet(nn.Module):
    """LeNet-5-like: conv-BN-ReLU, unpadded conv-BN-ReLU, pool, then a two-layer classifier."""

    def __init__(self, pad_second: int = 0) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, padding=pad_second, bias=False), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.MaxPool2d(2))
        side = 6 if pad_second else 5
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * side * side, 24), nn.ReLU(), nn.Linear(24, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def trained_like(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.weight, module.bias, module.running_mean):
                    tensor.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model.eval()


@torch.no_grad()
def zero_channels(layer: nn.Module, channels: list[int], bn: nn.Module | None = None, bias: bool = False) -> None:
    """Zero output ``channels`` of ``layer`` (and the bias, and ``bn``'s affine terms when asked)."""
    layer.weight[channels] = 0
    if bias and layer.bias is not None:
        layer.bias[channels] = 0
    if bn is not None:
        bn.weight[channels], bn.bias[channels] = 0, 0


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_function(small: nn.Module, model: nn.Module, shape) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))  # not the example batch
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_shrink_mlp_removes_zero_rows_and_folds_constant_outputs_into_the_next_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    zero_channels(model[0], [0, 1, 2], bias=True)       # output exactly 0: removed outright
    zero_channels(model[0], [5, 6, 9])                  # constant relu(bias): folded into model[2].bias
    with torch.no_grad():
        model[0].bias[[5, 6, 9]] = torch.tensor([0.5, 0.7, -0.3])  # the last is 0 after ReLU: nothing to fold
    zero_channels(model[2], [3, 4, 7, 8])
    before = [p.clone() for p in model.parameters()]
    small, report = shrink(model, torch.randn(16, 8))
    assert (small[0].out_features, small[2].in_features, small[2].out_features, small[4].in_features) == (10, 10,
                                                                                                          12, 12)
    assert report.removed == {"0": 6, "2": 4} and report.absorbed["0"] == 2
    assert params(small) == report.params_after == params(model) - 6 * (8 + 1) - 6 * 16 - 4 * (10 + 1) - 4 * 3
    assert_same_function(small, model, (32, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the input model is unchanged


def test_shrink_conv_bn_net_removes_channels_through_batchnorm_and_flatten():
    model = trained_like(ConvNet())
    zero_channels(model.features[0], [0, 1, 2])         # BN shift makes a constant: folded into the unpadded conv
    zero_channels(model.features[3], [1, 4], model.features[4])         # BN zeroed too: removed outright
    zero_channels(model.features[3], [6])               # constant BN shift after ReLU and pool: folded into Linear
    zero_channels(model.classifier[1], [0, 10, 20], bias=True)
    small, report = shrink(model, torch.randn(4, 1, 12, 12))
    assert [small.features[0].out_channels, small.features[1].num_features, small.features[3].in_channels,
            small.features[3].out_channels, small.features[4].num_features] == [3, 3, 3, 5, 5]
    assert small.classifier[1].in_features == 5 * 25 and small.classifier[1].out_features == 21
    assert report.removed == {"features.0": 3, "features.3": 3, "classifier.1": 3}
    # conv 3x(9+1), BN 3x2, conv 5x3x9 plus the bias the fold created (5), BN 5x2, Linear 125x21+21, Linear 21x10+10
    assert params(small) == report.params_after == 30 + 6 + 135 + 5 + 10 + 2646 + 220 < params(model) * 0.55
    assert_same_function(small, model, (3, 1, 12, 12))


def test_shrink_keeps_constant_channels_a_zero_padded_conv_reads_and_the_output_layer():
    model = trained_like(ConvNet(pad_second=1))
    zero_channels(model.features[0], [0, 1])
    with torch.no_grad():
        model.features[1].bias[:2] = 3.0                 # a positive constant after ReLU, then zero padding
    zero_channels(model.classifier[3], [0])
    small, report = shrink(model, torch.randn(4, 1, 12, 12))
    assert small.features[0].out_channels == 6 and small.classifier[3].out_features == 10
    assert "zero-padded conv" in report.skipped["features.0"]
    assert "feeds the model output" in report.skipped["classifier.3"]
    assert report.params_after == params(model)
    assert_same_function(small, model, (3, 1, 12, 12))


def test_shrink_removes_channels_whose_batchnorm_has_zero_scale_and_shift():
    model = trained_like(ConvNet())
    with torch.no_grad():  # a channel mask on the BatchNorm: the conv rows stay, the BN outputs exactly 0
        model.features[1].weight[[0, 2]], model.features[1].bias[[0, 2]] = 0, 0
        model.features[4].weight[5] = 0                 # scale alone: the shift remains, nothing to silence
    small, report = shrink(model, torch.randn(4, 1, 12, 12))
    assert report.silenced == {"features.0": 2} and report.removed == {"features.0": 2}
    assert small.features[0].out_channels == small.features[3].in_channels == 4
    assert small.features[3].out_channels == 8 and torch.count_nonzero(model.features[0].weight[[0, 2]]) > 0
    assert_same_function(small, model, (3, 1, 12, 12))


def test_semi_structured_benchmark_exits_with_a_message_without_cuda():
    results = README.parent / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.glob("semi_structured.*")}
    done = subprocess.run([sys.executable, str(README.parent / "benchmarks" / "semi_structured.py")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 1
    assert "needs a CUDA GPU" in done.stderr and "Nothing was written" in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("semi_structured.*")} == before


def test_shrink_refuses_a_masked_model_and_the_message_names_the_fix():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    attach(model)
    with pytest.raises(ValueError, match=r"still carries masks; call lightning_masks.fold\(model\)"):
        shrink(model, torch.randn(2, 4))


def test_shrunk_program_runs_in_plain_pytorch(tmp_path):
    model = trained_like(ConvNet())
    zero_channels(model.features[3], [0, 2, 3], model.features[4])
    small, report = shrink(model, torch.randn(4, 1, 12, 12))
    x = torch.randn(2, 1, 12, 12)
    save_program(small, x, tmp_path / "small.pt2")
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    run_plain(f"""import torch
io = torch.load({str(tmp_path / 'io.pt')!r})
program = torch.export.load({str(tmp_path / 'small.pt2')!r}).module()
torch.testing.assert_close(program(io["x"]), io["y"], rtol=1e-5, atol=1e-5)
""")


# --- the command -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def masked_checkpoint(tmp_path_factory):
    """A checkpoint of TinyModule pruned to 95% by the callback, masks not folded."""
    pl.seed_everything(0, verbose=False)
    module = TinyModule(hidden=32)
    trainer = make_trainer(max_epochs=2, callbacks=[MaskPruningCallback(0.95, fold_on_fit_end=False,
                                                                        schedule=Schedule(end=1))])
    trainer.fit(module)
    path = tmp_path_factory.mktemp("ckpt") / "masked.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_command_saves_sparse_and_shrinks_a_masked_checkpoint(masked_checkpoint, tmp_path, capsys):
    output = tmp_path / "out" / "tiny.safetensors"
    main([str(masked_checkpoint), "-o", str(output), "--shrink", "--module-class", "helpers:TinyModule",
          "--input-shape", "16,8"])
    printed = capsys.readouterr().out
    ratio = float(re.search(r": [\d,]+ bytes, ([\d.]+) of the dense", printed).group(1))
    assert ratio < 0.5
    folded = fold_state_dict(load_checkpoint(masked_checkpoint)["state_dict"])
    assert_bit_equal(folded, load_sparse(output))
    model = TinyModule.load_from_checkpoint(fold_checkpoint(masked_checkpoint, tmp_path / "plain.ckpt")).eval()
    assert re.search(r"tiny.pt2: [\d,]+ of [\d,]+ parameters", printed)
    program = torch.export.load(output.with_suffix(".pt2")).module()
    x = torch.randn(5, 8)
    torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)
    hidden_zero_rows = int((model.net[0].weight == 0).all(1).sum())
    assert hidden_zero_rows > 0 and f"{hidden_zero_rows} channels removed" in printed


@pytest.mark.parametrize("arguments, message", [
    (["missing.ckpt"], r"checkpoint '.*missing.ckpt' does not exist"),
    (["{corrupt}"], r"could not read checkpoint '.*corrupt.ckpt'"),
    (["{masked}", "--shrink", "--input-shape", "4,8"], r"--shrink needs --module-class"),
    (["{masked}", "--shrink", "--module-class", "helpers.TinyModule", "--input-shape", "4,8"],
     r"not of the form pkg.module:ClassName"),
    (["{masked}", "--shrink", "--module-class", "helpers:Nope", "--input-shape", "4,8"], r"could not be imported"),
    (["{masked}", "--shrink", "--module-class", "helpers:TinyModule", "--input-shape", "4,x"], r"is not a shape"),
])
def test_command_errors_name_the_value_and_keep_the_output(masked_checkpoint, tmp_path, capsys, arguments, message):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(masked_checkpoint.read_bytes()[:300])
    output = tmp_path / "kept.safetensors"
    output.write_bytes(b"what the user had")
    arguments = [a.format(corrupt=corrupt, masked=masked_checkpoint) for a in arguments]
    with pytest.raises(SystemExit) as exit_:
        main([arguments[0].replace("missing.ckpt", str(tmp_path / "missing.ckpt")), "-o", str(output),
              *arguments[1:]])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert output.read_bytes() == b"what the user had"


def test_console_script_points_at_main():
    text = (README.parent / "pyproject.toml").read_text()
    assert 'lightning-masks-export = "lightning_masks.export.command:main"' in text


class KeywordModel(nn.Module):
    """A model called with keyword inputs, as ``example_input_array = {"x": ..., "scale": ...}`` calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x, scale=None):
        return self.layer(x) * scale


@pytest.mark.parametrize("example", [{"x": torch.randn(4, 3), "scale": torch.randn(4, 1)},
                                     (torch.randn(4, 3), torch.randn(4, 1))])
def test_a_program_is_saved_from_keyword_or_positional_example_inputs_with_any_batch_size(example, tmp_path):
    model = KeywordModel()
    path = save_program(model, example, tmp_path / "model.pt2")
    program = torch.export.load(path).module()
    x, scale = torch.randn(7, 3), torch.randn(7, 1)
    called = program(x=x, scale=scale) if isinstance(example, dict) else program(x, scale)  # as exported
    torch.testing.assert_close(called, model(x, scale=scale))
