"""Screen (not shipped): straight-through gradients to pruned scores with regrow=True during the ramp only."""
import dataclasses
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from lightning.pytorch.callbacks import Callback
from lightning_masks import masks as M

def forward(self, weight):
    g = M.gate_value(self.scores, self.temperature, self.gate_scale)
    keep = self.keep.to(g.dtype)
    return weight * (g * keep + (g - g.detach()) * (1 - keep))

M.MaskGate.forward = forward


class StopRegrowth(Callback):
    def __init__(self, pruner, end):
        self.pruner, self.end = pruner, end

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch >= self.end:
            self.pruner.selector = dataclasses.replace(self.pruner.selector, regrow=False)


import quality
plain_masks = quality.masks


def masks(model, plan, **options):
    (pruner,) = plain_masks(model, plan, **options)
    return [pruner, StopRegrowth(pruner, plan.end)]


quality.METHODS["masks"] = masks
quality.main(sys.argv[1:])
