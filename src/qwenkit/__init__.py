"""qwenkit: pick, run, serve, quantize, tune, evaluate and watch Qwen-family models on your own hardware.

Layout (one folder per concern):
  tokenizer/    the real Qwen vocabulary built offline into tokenizer.json; special tokens; encoding
  chat/         messages → prompt (renderer, Jinja templates); generated text → reasoning/content/tools
  checkpoints/  model references (local dir, .gguf, HF id, modelscope:) and built-in demo checkpoints
  engines/      token-only inference engines and their shared types (sampling parameters, requests)
  cli/          the `qwenkit` command (typer + rich)
"""

__version__ = "0.1.0"
