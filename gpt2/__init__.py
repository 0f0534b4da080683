"""GPT-2 in plain PyTorch (nanoGPT style, Hugging Face parameter names), trained with lazygraph.

    python -m gpt2.demo      # tiny GPT-2, eager vs lazygraph, side by side
    python -m gpt2.train     # train on a text file (--mode eager|lazy|compiled, --resume, --init-from HF_DIR)
    python -m gpt2.sample    # generate from a checkpoint or a Hugging Face folder (--ckpt, --hf)
    python -m gpt2.sample --random --compile --greedy --max-new-tokens 20   # static KV cache, eager vs compiled

gpt2.decode.Decoder(model, compile=True).generate(idx, n) decodes through one compiled program.

GPT.from_pretrained(dir) / model.save_pretrained(dir) read and write Hugging Face GPT-2 folders.
"""

from .data import ByteTokenizer, HFTokenizer, get_batch, get_tokenizer, load_text
from .model import GPT, PRESETS, GPTConfig, make_optimizer
from .weights import CheckpointMismatchError, convert_hf_state_dict, load_hf_state_dict, read_state_dict

__all__ = ["GPT", "GPTConfig", "PRESETS", "make_optimizer", "ByteTokenizer", "HFTokenizer", "get_tokenizer",
           "load_text", "get_batch", "load_hf_state_dict", "read_state_dict", "convert_hf_state_dict",
           "CheckpointMismatchError"]
