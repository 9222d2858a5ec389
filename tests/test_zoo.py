"""The zoo's data modules read their file formats, fail clearly on missing files, and its models run."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from helpers.datafiles import idx_bytes, write_cifar10, write_fashion_mnist

from lightning_masks.zoo.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    SyntheticDataModule,
    read_idx,
)
from lightning_masks.zoo.models import (
    MLP,
    LeNet5,
    LeNet5Caffe,
    ResNet20,
    TransferClassifier,
    TransformerClassifier,
    pretrained,
)


@pytest.mark.parametrize("zipped", [True, False])
def test_read_idx_round_trips(tmp_path, zipped):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.gz" if zipped else "a")
    path.write_bytes(gzip.compress(idx_bytes(array)) if zipped else idx_bytes(array))
    assert torch.equal(read_idx(path), torch.from_numpy(array))


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((4, 2), dtype=np.uint8))[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_reads_gz_and_plain_files(tmp_path):
    data = FashionMNISTDataModule(write_fashion_mnist(tmp_path, train=40, test=12), val_size=8, batch_size=16)
    data.setup()
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (32, 8, 12)
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (16, 1, 28, 28) and labels.dtype == torch.long
    train_images = torch.cat([data.train_set.tensors[0], data.val_set.tensors[0]])
    assert abs(float(train_images.mean())) < 1e-4 and abs(float(train_images.std()) - 1) < 1e-2  # standardised


def test_fashion_mnist_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(tmp_path).setup()


def test_cifar10_reads_pickle_batches(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=10)
    data = CIFAR10DataModule(tmp_path, val_size=10, batch_size=8)  # the parent folder works too
    data.setup()
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (40, 10, 10)
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and int(labels.max()) < 10


def test_cifar10_missing_batches_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1..5, test_batch"):
        CIFAR10DataModule(tmp_path).setup()
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10DataModule(tmp_path).setup()


def test_synthetic_and_digits_splits_are_seeded_and_disjoint():
    first, second = SyntheticDataModule(num_samples=40, input_shape=[2, 3]), SyntheticDataModule(num_samples=40,
                                                                                                input_shape=[2, 3])
    first.setup(), second.setup()
    assert torch.equal(first.train_set.tensors[0], second.train_set.tensors[0])
    assert first.train_set.tensors[0].shape == (40, 2, 3) and len(first.val_set) == 10
    digits = DigitsDataModule(seed=1)
    digits.setup()
    seen = [set(map(tuple, part.tensors[0].tolist())) for part in (digits.train_set, digits.test_set)]
    assert len(seen[0] & seen[1]) < 10  # (a few digits are exact duplicates in the data set itself)
    assert len(digits.train_set) + len(digits.val_set) + len(digits.test_set) == 1797


@pytest.mark.parametrize("model, shape", [
    (MLP(in_features=784, hidden=[30, 20]), (2, 1, 28, 28)),
    (LeNet5(), (2, 1, 28, 28)),
    (LeNet5(in_channels=3, image_size=32), (2, 3, 32, 32)),
    (LeNet5Caffe(), (2, 1, 28, 28)),
    (LeNet5Caffe(in_channels=3, image_size=32), (2, 3, 32, 32)),
    (ResNet20(width=4, blocks=1), (2, 3, 32, 32)),
    (ResNet20(width=4, blocks=1, shortcut="projection"), (2, 3, 32, 32)),
    (TransformerClassifier(seq_len=28, token_dim=28, dim=16, heads=2), (2, 1, 28, 28)),
])
def test_models_map_inputs_to_class_logits(model, shape):
    assert model(torch.randn(shape)).shape == (2, 10)


@pytest.mark.parametrize("model, weights", [(LeNet5(), 61_470), (LeNet5Caffe(), 430_500)])
def test_lenet_variants_have_the_weight_counts_the_docs_quote(model, weights):
    # LeNet-5-Caffe's 430,500 is the literature's "431K" (Han et al. 2015; Molchanov et al. 2017)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sum(m.weight.numel() for m in layers) == weights


def test_model_arguments_are_checked():
    with pytest.raises(ValueError, match="divisible by heads"):
        TransformerClassifier(dim=10, heads=4)
    with pytest.raises(ValueError, match="image_size"):
        LeNet5(image_size=8)
    with pytest.raises(ValueError, match="image_size >= 16"):
        LeNet5Caffe(image_size=15)
    with pytest.raises(ValueError, match="shortcut must be 'pad' or 'projection'"):
        ResNet20(shortcut="conv")


def test_resnet_projection_shortcuts_add_a_1x1_conv_bn_where_the_width_doubles():
    pad, projection = ResNet20(width=4, blocks=2), ResNet20(width=4, blocks=2, shortcut="projection")
    extra = sum(p.numel() for p in projection.parameters()) - sum(p.numel() for p in pad.parameters())
    assert extra == (4 * 8 + 2 * 8) + (8 * 16 + 2 * 16)
    assert projection.net[5].shortcut[0].stride == (2, 2) and projection.net[3].shortcut is None


def test_optimizer_and_scheduler_factories_are_used():
    model = MLP(optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
                scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1))
    configured = model.configure_optimizers()
    assert isinstance(configured["optimizer"], torch.optim.SGD) and configured["optimizer"].defaults["lr"] == 0.5
    assert "optimizer" not in model.hparams
    assert isinstance(MLP().configure_optimizers(), torch.optim.Adam)


def test_python_source_is_split_by_path_and_a_tiny_llama_learns_its_windows(tmp_path):
    from lightning_masks.zoo.text import CausalLM, PythonSourceDataModule, python_sources, tiny_llama

    train, held_out = python_sources("train"), python_sources("held_out")
    assert train and held_out and not set(train) & set(held_out)
    data = PythonSourceDataModule(cache_dir=str(tmp_path), vocab_size=300, seq_len=16, batch_size=4,
                                  train_chars=20_000, held_out_chars=5_000, eval_windows=8)
    data.setup()
    (window,) = next(iter(data.val_dataloader()))
    assert window.shape == (4, 17) and int(window.max()) < 300
    assert torch.equal(next(iter(data.val_dataloader()))[0], window)  # fixed evaluation windows
    assert (data.tokenizer_dir / "vocab.json").exists()
    module = CausalLM(tiny_llama(vocab_size=300, hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64))
    assert module.model.training and module(window[:, :-1]).shape == (4, 16, 300)


# ------------------------------------------------------------------------------------------ transfer tasks
def test_fashion_mnist_classes_keep_those_images_relabelled_in_order(tmp_path):
    root = write_fashion_mnist(tmp_path, train=200, test=100)
    everything = FashionMNISTDataModule(root, val_size=10)
    everything.setup()
    part = FashionMNISTDataModule(root, val_size=10, classes=[7, 5])
    part.setup()
    test_x, test_y = everything.test_set.tensors
    chosen = (test_y == 7) | (test_y == 5)
    assert part.num_classes == 2 and torch.equal(part.test_set.tensors[1], (test_y[chosen] == 5).long())
    assert torch.equal(part.test_set.tensors[0], test_x[chosen])  # standardized by all ten classes alike
    with pytest.raises(ValueError, match=r"classes must be distinct class indices in \[0, 10\), got \[1, 1\]"):
        FashionMNISTDataModule(root, classes=[1, 1])


def test_pretrained_trains_once_then_reads_the_cache_and_transfer_freezes_at_backbone_lr_0(tmp_path):
    data = FashionMNISTDataModule(write_fashion_mnist(tmp_path / "data"), val_size=8, batch_size=16, classes=[0, 1, 2])
    path = tmp_path / "cache" / "source.pt"
    fresh = MLP(784, 3, hidden=(12,))
    start = {k: v.clone() for k, v in fresh.state_dict().items()}
    first = pretrained(fresh, data, epochs=1, path=path)
    assert path.is_file() and not torch.equal(first.net[1].weight, start["net.1.weight"])  # trained
    again = pretrained(MLP(784, 3, hidden=(12,)), data, epochs=1, path=path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), first.state_dict().values()))
    frozen = TransferClassifier(again, num_classes=4, backbone_lr=0.0)
    assert torch.equal(frozen.net.backbone[1].weight, first.net[1].weight) and frozen.net.head.out_features == 4
    assert not any(p.requires_grad for p in frozen.net.backbone.parameters())
    assert [len(g["params"]) for g in frozen.configure_optimizers().param_groups] == [2]
    small = TransferClassifier(MLP(784, 3, hidden=(12,)), num_classes=4, backbone_lr=1e-4)
    assert [(len(g["params"]), g["lr"]) for g in small.configure_optimizers().param_groups] == [(2, 1e-3), (2, 1e-4)]
