"""The Lightning glue: the callback, its argument checks, the optimizer glue, companions, the fit's report."""
