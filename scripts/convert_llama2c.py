"""Convert a llama2.c checkpoint (the "legacy" float32 .bin format) to Meta's layout.

    python scripts/convert_llama2c.py MODEL.bin TOKENIZER.model OUT_DIR [--num_shards N]

The conversion is llama.llama2c's; `python -m llama.download stories15M` downloads and converts in one step.
"""
import json
import sys

from llama import cli
from llama.llama2c import convert_llama2c


def main(model_path: str, tokenizer_path: str, out_dir: str, num_shards: int = 1) -> None:
    """Convert a llama2.c checkpoint (karpathy/llama2.c's "legacy" float32 .bin) to a Meta-layout folder: params.json
    (with the context the model was trained with as max_seq_len), consolidated.NN.pth and tokenizer.model. OUT_DIR
    appears only once it is complete.

    Args:
        model_path: the llama2.c .bin file (e.g. stories15M.bin).
        tokenizer_path: the SentencePiece tokenizer.model it was trained with (tok512.model for stories260K,
            Llama 2's for the others).
        out_dir: the folder to write.
        num_shards: model-parallel shards to write.
    """
    out = convert_llama2c(model_path, tokenizer_path, out_dir, num_shards)
    print(f"wrote {out}: {json.loads((out / 'params.json').read_text())}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
