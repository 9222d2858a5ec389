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
# The init sweep from the command line on the fine-pruning recipe (finepruning_init_sweep.md; shortened to 1 epoch),
# then its report:
lightning-masks-train -m recipe=fashion_transfer_lenet300 masks.sparsity=0.995 masks/init=magnitude,stddev,magnitude_noise,snip,wanda \
    masks.init.noise_scale=0.01 seed=0,1,2 trainer.max_epochs=1 logger=none masks.plots=false masks.log_histograms=false \
    hydra.sweep.dir=sweep1
lightning-masks-report sweep1
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
# LeNet-5, 8 epochs, seed 0 (finepruning_lenet5_e8; the two weight lrs as two jobs side by side):
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet5 --epochs 8 --name finepruning_lenet5_e8 --seeds 0 \
    --weight-lrs 0 1e-4 --sparsities 0.98 0.995 --methods dense gmp masks finetuning
# LeNet-5, 8 epochs, seeds 1 and 2 (the same file; the two weight lrs as two jobs side by side):
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet5 --epochs 8 --name finepruning_lenet5_e8 --seeds 1 2 \
    --weight-lrs 0 --sparsities 0.98 0.995 --methods dense gmp masks finetuning
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet5 --epochs 8 --name finepruning_lenet5_e8 --seeds 1 2 \
    --weight-lrs 1e-4 --sparsities 0.98 0.995 --methods dense gmp masks finetuning
