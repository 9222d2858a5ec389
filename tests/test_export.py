"""Export: sparse save (bit-exact, small), physical shrink of zero channels, the command, plain-PyTorch loading."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_masks.export import load_sparse, save_sparse

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
