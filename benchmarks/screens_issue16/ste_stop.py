"""Screen (not shipped): straight-through gradients to pruned scores with regrow=True during the ramp only."""
import dataclasses
import sys

from lightning.pytorch.callbacks import Callback
from ste import patch  # this folder is on sys.path when the script runs; ste puts benchmarks/ there

patch()


class StopRegrowth(Callback):
    def __init__(self, pruner, end):
        self.pruner, self.end = pruner, end

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch >= self.end:
            self.pruner.selector = dataclasses.replace(self.pruner.selector, regrow=False)


import quality  # noqa: E402

plain_masks = quality.masks


def masks(model, plan, **options):
    (pruner,) = plain_masks(model, plan, **options)
    return [pruner, StopRegrowth(pruner, plan.end)]


quality.METHODS["masks"] = masks
quality.main(sys.argv[1:])
