"""One-shot Wanda or SparseGPT through llm-compressor's ``oneshot``, run in its own environment by benchmarks/llm.py.

    python llm_compressor_oneshot.py MODEL_DIR OUT_DIR {wanda,sparsegpt} {50%,2:4} CALIBRATION.pt TOKENIZER_DIR

``CALIBRATION.pt`` holds a LongTensor of token windows ``(n, length)``; ``TOKENIZER_DIR`` the byte-level BPE's
``vocab.json`` and ``merges.txt`` (oneshot wants a processor beside a dataset). The decoder Linears are pruned; the LM head
is left dense.
"""

import sys

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.obcq import SparseGPTModifier
from llmcompressor.modifiers.pruning import WandaPruningModifier
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


def main() -> None:
    model_dir, out_dir, method, pattern, calibration, tokenizer_dir = sys.argv[1:7]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=ByteLevelBPETokenizer(
        f"{tokenizer_dir}/vocab.json", f"{tokenizer_dir}/merges.txt"))
    windows = torch.load(calibration)
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method](
        sparsity=0.5, mask_structure="2:4" if pattern == "2:4" else "0:0", targets=["Linear"], ignore=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=[modifier], num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1])
    model.save_pretrained(out_dir)


if __name__ == "__main__":
    main()
