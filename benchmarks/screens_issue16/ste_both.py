"""Screen (not shipped): straight-through gradients to pruned weights AND scores, with regrow=True: pruned entries
keep training in the shadow (dense gradient) and come back when |w * gate| ranks them in again."""
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from lightning_masks.masking import masks as M


def forward(self, weight):
    g = M.gate_value(self.scores, self.temperature, self.gate_scale)
    keep = self.keep.to(g.dtype)
    dense = weight * g
    return dense * keep + (dense - dense.detach()) * (1 - keep)

M.MaskGate.forward = forward
import quality  # noqa: E402

quality.main(sys.argv[1:])
