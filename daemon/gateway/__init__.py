"""The OpenAI-compatible HTTP gateway: its own process, an ordinary client of the router.

``python -m exgen.daemon.gateway`` runs it alone; ``exgen serve --http HOST:PORT``
starts and supervises it (:mod:`keeper`). Nothing here is imported by the light
client, and nothing but ``app`` and ``__main__`` imports FastAPI.
"""
