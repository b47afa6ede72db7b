"""The OpenAI-compatible HTTP gateway: its own process, an ordinary client of the router.

``python -m exgen.daemon.gateway`` runs it alone; ``exgen serve --http HOST:PORT``
starts it and keeps it running (supervisor/gateway_keeper.py). Nothing here is imported by the light
client, and nothing but ``app`` and ``__main__`` imports FastAPI.
"""
