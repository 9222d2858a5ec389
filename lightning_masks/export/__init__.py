"""Plain checkpoints, sparse files, shrink and the export command."""
