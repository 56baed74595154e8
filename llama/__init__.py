"""Pure-PyTorch LLaMA inference with fairscale model parallelism."""
from llama.checkpoint import CheckpointError
from llama.generation import ChatPrediction, CompletionPrediction, Dialog, Llama, Message
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = [
    "ChatPrediction",
    "CheckpointError",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelArgs",
    "Transformer",
    "Tokenizer",
]
