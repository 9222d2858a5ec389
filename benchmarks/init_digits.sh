#!/bin/bash
# When does the initializer matter? The seed article's three initializers (magnitude, stddev, magnitude_noise
# across noise_scale) on the default run (MLP on scikit-learn's digits, 15 epochs) at 98%, 5 seeds each, with
# the gate rescaled (the default) and not (the article's plain form). 60 jobs, ~3 s of fit each.
# Usage: benchmarks/init_digits.sh [OUT]   then   lightning-masks-report OUT   (or OUT/defaults, OUT/plain)
set -e
export OMP_NUM_THREADS=1
OUT=$(realpath -m "${1:-multirun/init_digits}")
PY=${PYTHON:-python}
COMMON="masks.sparsity=0.98 seed=0,1,2,3,4 logger=none trainer.enable_progress_bar=false trainer.enable_model_summary=false masks.logging.plots=false masks.logging.histograms=false trainer.enable_checkpointing=false"
for regime in "defaults:masks.state.rescale_gate=true trainer.max_epochs=15" "plain:masks.state.rescale_gate=false trainer.max_epochs=15"; do
  name=${regime%%:*}; settings=${regime#*:}
  $PY -m lightning_masks.app.train -m masks/init=magnitude,stddev $settings $COMMON hydra.sweep.dir=$OUT/$name/plain_inits
  $PY -m lightning_masks.app.train -m masks/init=magnitude_noise masks.init.noise_scale=0.01,0.1,1.0,10.0 $settings $COMMON hydra.sweep.dir=$OUT/$name/noise
done
