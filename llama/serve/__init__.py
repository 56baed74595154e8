"""An OpenAI-compatible HTTP API and a Gradio page over one Llama's engine (the `serve` extra).

`serve.py` at the top of the repository is the command line; `create_app` builds the FastAPI app
for a `Service`, which holds the model (None while it loads) and submits every request, the API's
and the page's alike, to the same engine.
"""
from llama.serve.app import ServeConfig, create_app
from llama.serve.service import Service

__all__ = ["ServeConfig", "Service", "create_app"]
