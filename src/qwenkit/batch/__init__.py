"""Offline batch jobs in OpenAI's Batch format: the file format (format.py) and running lines through the
server's native path or against a server (run.py); `qwenkit batch` (cli/batch.py) and the server's
/v1/files + /v1/batches (serve/apis/batches.py) are built on them."""
