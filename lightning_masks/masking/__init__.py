"""The mask mechanism: nn.Module in, masked nn.Module out (gate, attach/fold, layer kinds, targets, initializers,
state-dict layout, statistics). Imports no Lightning and no selection."""
