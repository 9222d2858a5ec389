"""Run by .ci/run in a fresh environment holding `pip install .` alone (no extras): the callback imports and fits a
model to its exact sparsity, and each extra's feature fails naming its extra."""

import importlib
import tempfile

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_masks import MaskPruningCallback


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


torch.manual_seed(0)
data = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,))), batch_size=8)
model = Tiny()
with tempfile.TemporaryDirectory() as folder:
    pl.Trainer(max_epochs=2, callbacks=[MaskPruningCallback(0.5)], enable_progress_bar=False,
               default_root_dir=folder).fit(model, data)
zeros = sum(int((m.weight == 0).sum()) for m in model.net if isinstance(m, nn.Linear))
assert zeros == 80, f"{zeros} of 160 weights are zero, expected exactly 80"
for module, name in [("lightning_masks.app.train", "app"), ("lightning_masks.export.shrink", "export"),
                     ("lightning_masks.export.sparse_file", "export")]:
    try:
        importlib.import_module(module)
    except ImportError as error:
        assert f"lightning-masks[{name}]" in str(error), error
    else:
        raise AssertionError(f"{module} imported without its extra [{name}]")
print("core install: the callback fits to exactly 80 of 160 zeros; app and export name their extras")
