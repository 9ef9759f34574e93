"""`qwenkit serve`: the OpenAI-compatible HTTP server over the Engine protocol.

Public API: create_app(engine, tokenizer, flavor, model_name, config) → FastAPI; ServeConfig;
run_server(app, sock, shutdown_timeout) / bind_socket(host, port). Modules: protocol (wire types),
handlers (translation), tools (tool_choice grammars), security (keys, rate limits, body cap),
metrics, logs, errors, server (uvicorn + graceful SIGTERM).
"""

from qwenkit.serve.app import create_app
from qwenkit.serve.config import ServeConfig
from qwenkit.serve.server import bind_socket, run_server

__all__ = ["ServeConfig", "bind_socket", "create_app", "run_server"]
