"""Sockets and what crosses them: the client socket (listen.py), the workers' socket
(workerlink.py), CURVE keys (curve.py), the router-worker rows (wire.py)."""
