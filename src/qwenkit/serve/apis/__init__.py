"""Wire protocols over the one native request path (serve/handlers.py): one module per API.

Contract: each module only translates its request into the native chat request and the native parsed
events into its own response objects and stream; limits, auth, tools, grammar, thinking, usage, logs and
metrics stay in the native path.
"""
