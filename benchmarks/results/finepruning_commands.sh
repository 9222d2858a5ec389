# The commands that made benchmarks/results/finepruning_*.{jsonl,md,png} (from the repository root, 2 shared CPU cores).
# LeNet-300-100: every arm, every weight lr and sparsity, seed 0; seeds 1 and 2 for the headline cells.
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --seeds 0 \
    --methods dense gmp masks movement oneshot model_pruning masks_soft
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --seeds 1 2 \
    --weight-lrs 0 1e-4 --sparsities 0.98 0.995 --methods dense gmp masks movement masks_soft
# The fine-pruning settings study (item 4), seed 0 then 1 2:
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --name finepruning_lenet300_study \
    --weight-lrs 0 1e-4 --sparsities 0.98 0.995 --seeds 0 --methods masks "masks[start=0.15]" "masks[mask_lr=0.05]" \
    "masks[mask_lr=0.003]" "masks[importance=gate]" "masks[rescale_gate=False]" "masks[start=0.15,mask_lr=0.05]"
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --name finepruning_lenet300_study \
    --weight-lrs 1e-4 --sparsities 0.98 0.995 --seeds 1 2 --methods "masks[importance=gate]" "masks[mask_lr=0.05]"
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --seeds 1 2 --weight-lrs 1e-3 --sparsities 0.98 0.995 --methods dense gmp masks
# The initializers in the fine-pruning regime, 3 seeds at 99.5%:
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --name finepruning_lenet300_init \
    --weight-lrs 0 1e-4 --sparsities 0.995 --seeds 0 1 2 --methods masks "masks[init=stddev]" \
    "masks[init=magnitude_noise,init.noise_scale=0.001]" "masks[init=magnitude_noise]" \
    "masks[init=magnitude_noise,init.noise_scale=0.1]" "masks[init=snip]"
# LeNet-5, seed 0:
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet5 --epochs 3 --seeds 0 --weight-lrs 0 1e-4 \
    --sparsities 0.98 0.995 --methods dense gmp masks movement masks_soft
# The init sweep from the command line on the fine-pruning recipe (checked on a short run: 30 batches, 1 epoch):
# lightning-masks-train -m recipe=fashion_transfer_lenet300 masks/init=magnitude,stddev seed=0,1 && lightning-masks-report multirun/...
# Wanda added to the init study above (3 epochs, the defaults' binary masks frozen; the other rows ran on an earlier
# commit of the same benchmark):
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --name finepruning_lenet300_init \
    --weight-lrs 0 1e-4 --sparsities 0.995 --seeds 0 1 2 --methods "masks[init=wanda]"
# The gate-headroom study (the finetuning preset's shift of the initial scores; 3 epochs, seed 0) into the study file.
# finetuning[init.shift=0] is the preset before the shift (gates start near one half):
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --name finepruning_lenet300_study \
    --seeds 0 --weight-lrs 1e-4 --sparsities 0.98 0.995 --methods gmp masks "masks[end=0.34]" "masks[temperature=0.5]" \
    "masks[mask_lr=0.03]" "masks[init=wanda]" "masks[importance=gate,end=0.34]" "masks[importance=gate]" movement \
    "finetuning[init.shift=0]" "masks[init.shift=-1]" "masks[init.shift=-2]" "masks[importance=gate,init.shift=-1]" \
    "masks[importance=gate,straight_through=True,regrow=True]" "masks[importance=gate,regrow=True]" \
    "movement[mask_lr=0.03]" "movement[init.shift=-1]"
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --name finepruning_lenet300_study \
    --seeds 0 --weight-lrs 1e-4 0 1e-3 --sparsities 0.98 0.995 --methods dense gmp "finetuning[init.shift=0]" \
    "finetuning[init.shift=-2]" "finetuning[init.shift=-3]" "finetuning[init.shift=-4]" "finetuning[init.shift=-3,importance=gate]"
# LeNet-5, the fine-pruning preset (gates from sigmoid(-3)) added, seed 0, 3 epochs:
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet5 --epochs 3 --seeds 0 --weight-lrs 0 1e-4 \
    --sparsities 0.98 0.995 --methods finetuning
# The init sweep from the command line on the fine-pruning recipe (finepruning_init_sweep.md; shortened: 1 epoch of 60
# batches), then its report:
lightning-masks-train -m recipe=fashion_transfer_lenet300 masks.sparsity=0.995 masks/init=magnitude,stddev,magnitude_noise,snip,wanda \
    masks.init.noise_scale=0.01 seed=0,1,2 trainer.max_epochs=1 trainer.limit_train_batches=60 logger=none masks.plots=false \
    masks.log_histograms=false hydra.sweep.dir=sweep
lightning-masks-report sweep
# Does pretraining length explain the dense figures? Dense fine-tuning from a backbone pretrained 10 epochs instead of 3:
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 8 --pretrain-epochs 10 \
    --name finepruning_lenet300_pretrain10 --seeds 0 --weight-lrs 0 1e-4 --sparsities 0.98 --methods dense
# The initializers under the fine-pruning preset (each named init shifted by -3), 8 epochs, 3 seeds at 99.5%:
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 8 --name finepruning_lenet300_init_e8 \
    --weight-lrs 0 1e-4 --sparsities 0.995 --seeds 0 1 2 --methods finetuning "finetuning[init=stddev]" \
    "finetuning[init=magnitude_noise]" "finetuning[init=magnitude_noise,init.noise_scale=0.1]" "finetuning[init=snip]" \
    "finetuning[init=wanda]"
# The headline grid, 8 epochs (finepruning_lenet300_e8): seed 0 every arm at 98 / 99.5%, seeds 1 2 the main arms,
# then seed 0 at 90 / 95 / 99% (run as three background jobs side by side, appending to the one file):
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 8 --name finepruning_lenet300_e8 \
    --seeds 0 --weight-lrs 0 1e-4 1e-3 --sparsities 0.98 0.995 \
    --methods dense gmp masks movement finetuning oneshot model_pruning
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 8 --name finepruning_lenet300_e8 \
    --seeds 1 2 --weight-lrs 0 1e-4 1e-3 --sparsities 0.98 0.995 --methods dense gmp masks movement finetuning
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 8 --name finepruning_lenet300_e8 \
    --seeds 0 --weight-lrs 0 1e-4 1e-3 --sparsities 0.9 0.95 0.99 --methods dense gmp masks movement finetuning
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 8 --name finepruning_lenet300_e8 \
    --seeds 0 --weight-lrs 0 1e-4 1e-3 --sparsities 0.9 0.95 0.99 --methods oneshot model_pruning
# The soft gates at fit end (finepruning_lenet300_gates): gated and folded accuracy, the kept weights' factors,
# the defaults and the preset with gates from one half (init.shift=0) and from sigmoid(-3):
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --name finepruning_lenet300_gates \
    --seeds 0 --weight-lrs 0 1e-4 --sparsities 0.98 0.995 --methods masks "finetuning[init.shift=0]" finetuning
