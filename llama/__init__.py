"""Pure-PyTorch LLaMA inference with fairscale model parallelism."""
from llama.checkpoint import CheckpointError
from llama.generation import ChatPrediction, CompletionPrediction, Dialog, Llama, LogitsError, Message, Score
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Llama3Tokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ChatPrediction",
    "CheckpointError",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Llama3Tokenizer",
    "LogitsError",
    "Message",
    "ModelArgs",
    "Score",
    "Transformer",
    "Tokenizer",
    "load_tokenizer",
]
