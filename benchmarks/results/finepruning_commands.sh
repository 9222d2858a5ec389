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
    "masks[init=magnitude_noise,init_kwargs={'noise_scale':0.001}]" "masks[init=magnitude_noise]" \
    "masks[init=magnitude_noise,init_kwargs={'noise_scale':0.1}]" "masks[init=snip]"
# LeNet-5, seed 0:
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet5 --epochs 3 --seeds 0 --weight-lrs 0 1e-4 \
    --sparsities 0.98 0.995 --methods dense gmp masks movement masks_soft
# The init sweep from the command line on the fine-pruning recipe (checked on a short run: 30 batches, 1 epoch):
# lightning-masks-train -m recipe=fashion_transfer_lenet300 masks/init=magnitude,stddev seed=0,1 && lightning-masks-report multirun/...
