"""Screen (not shipped): anneal the gate's temperature geometrically from T0 to T1 over the ramp
(Continuous Sparsification anneals beta = 1/T), the rescale kept as 1/sigmoid(s0/T) so an untouched score's
gate stays 1 and a score that falls below 0 is switched off ever harder."""
import os
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch
from lightning.pytorch.callbacks import Callback

from lightning_masks.masking.masks import masked_tensors

T0, T1 = float(os.environ.get("T0", "1")), float(os.environ.get("T1", "0.02"))


class Anneal(Callback):
    def __init__(self, end_epoch):
        self.end_epoch, self.initial = end_epoch, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        gates = [entry.gate for entry in masked_tensors(pl_module)]
        if self.initial is None:
            self.initial = [g.scores.detach().clone() for g in gates]
            self.span = self.end_epoch * trainer.num_training_batches
        progress = min(1.0, trainer.global_step / self.span)
        t = T0 * (T1 / T0) ** progress
        with torch.no_grad():
            for g, s0 in zip(gates, self.initial):
                g.temperature.fill_(t)
                g.gate_scale.copy_(1.0 / torch.sigmoid(s0 / t))


import quality  # noqa: E402

plain_masks = quality.masks


def masks(model, plan, **options):
    return [*plain_masks(model, plan, **options), Anneal(plan.end)]


quality.METHODS["masks"] = masks
quality.main(sys.argv[1:])
