"""The end-of-fit pictures stay readable: bounded size at any number of mask updates and layers."""

import matplotlib.image
import numpy as np
import pytest

from lightning_masks.lightning import plots


def ramp(updates: int, layers: int) -> tuple[list[str], list[list[float]], list[float]]:
    """Cubic sparsity ramps over ``updates`` updates, deeper layers pruned harder."""
    names = [f"net.{2 * j}.weight" for j in range(layers)]
    t = np.linspace(0.0, 1.0, updates)
    history = [[float((1 - (1 - x) ** 3) * (0.5 + 0.5 * j / max(layers - 1, 1))) for j in range(layers)] for x in t]
    return names, history, [float(26 * i) for i in range(updates)]


@pytest.mark.parametrize("updates, layers", [(1, 1), (200, 3), (5000, 3), (12, 12), (400, 13), (300, 160)])
def test_sparsity_over_training_is_bounded_in_size_at_any_number_of_updates_and_layers(tmp_path, updates, layers):
    path = plots.sparsity_over_training(*ramp(updates, layers), tmp_path / "sparsity.png", unit="step")
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width <= 100 * plots.MAX_FIGSIZE[0] and height <= 100 * plots.MAX_FIGSIZE[1]
    assert width >= 400 and height >= 250  # not a strip either
    assert image[..., :3].std() > 0.05  # something is drawn


def test_sparsity_over_training_draws_what_it_is_given(tmp_path):
    names, history, positions = ramp(50, 3)
    first = matplotlib.image.imread(plots.sparsity_over_training(names, history, positions, tmp_path / "a.png"))
    flat = [[0.0] * 3 for _ in history]
    second = matplotlib.image.imread(plots.sparsity_over_training(names, flat, positions, tmp_path / "b.png"))
    assert first.shape == second.shape and np.abs(first - second).max() > 0.5


def test_sparsity_over_training_refuses_mismatched_history(tmp_path):
    names, history, positions = ramp(10, 3)
    with pytest.raises(ValueError, match="one position per update"):
        plots.sparsity_over_training(names, history, positions[:-1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="3 layers"):
        plots.sparsity_over_training(names[:2], history, positions, tmp_path / "x.png")
