"""The router, sans I/O: client and worker messages in, an outbox out.

Start at router.py (the calls the daemon's loop makes, and one prompt's way through
them); rooms.py holds the state, built once; each other module owns one side of the
traffic. Nothing here touches a socket or a process.
"""
