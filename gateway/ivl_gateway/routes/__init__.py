"""The HTTP API's routers, one module per endpoint group: chat completions, models, operations."""
