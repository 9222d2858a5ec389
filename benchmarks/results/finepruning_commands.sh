# The commands that made benchmarks/results/finepruning_*.{jsonl,md,png} (from the repository root, 2 shared CPU cores).
# LeNet-300-100: every arm, every weight lr and sparsity, seed 0; seeds 1 and 2 for the headline cells.
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --seeds 0 \
    --methods dense gmp masks movement oneshot model_pruning masks_soft
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --seeds 1 2 \
    --weight-lrs 0 1e-4 --sparsities 0.98 0.995 --methods dense gmp masks movement
# The fine-pruning settings study (item 4), seed 0 then 1 2:
PYTHONPATH=$PWD nice -n 10 python benchmarks/finepruning.py --model lenet300 --epochs 3 --name finepruning_lenet300_study \
    --weight-lrs 0 1e-4 --sparsities 0.98 0.995 --seeds 0 --methods masks "masks[start=0.15]" "masks[mask_lr=0.05]" \
    "masks[mask_lr=0.003]" "masks[importance=gate]" "masks[rescale_gate=False]" "masks[start=0.15,mask_lr=0.05]"
