"""The package's command lines, each a `main` whose flags llama.cli reads from its signature:

    llama-generate  (python -m llama.commands.generate, example.py)  complete text prompts
    llama-chat      (python -m llama.commands.chat, chat.py)          a chat in the terminal
    llama-serve     (python -m llama.serve, serve.py)                 an OpenAI-compatible API and a web page
    llama-download  (python -m llama.download, scripts/download.py)   weights from the Hugging Face Hub
"""
