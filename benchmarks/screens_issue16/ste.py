"""Screen (not shipped): straight-through gradients to pruned scores (movement pruning) with regrow=True.

What it screened ships as ``MaskPruningCallback(straight_through=True, regrow=True)``; ``ste_stop.py`` reuses the patch.
"""
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from lightning_masks.masking import masks as M  # noqa: E402


def forward(self, weight):
    g = M.gate_value(self.scores, self.temperature, self.gate_scale)
    keep = self.keep.to(g.dtype)
    return weight * (g * keep + (g - g.detach()) * (1 - keep))


def patch():
    M.MaskGate.forward = forward


if __name__ == "__main__":
    patch()
    import quality

    quality.main(sys.argv[1:])
