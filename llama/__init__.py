"""Pure-PyTorch LLaMA inference with fairscale model parallelism."""
from llama.chat_format import Dialog, Message
from llama.errors import CheckpointError, LogitsError
from llama.generation import ChatPrediction, CompletionPrediction, Llama, Score
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
