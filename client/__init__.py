"""exgen's client side: the library (`Client`, `AsyncClient`), the wire protocol and
the `exgen-client` CLI. Light on purpose: pyzmq, msgpack, click and tqdm only."""

from exgen.client import errors
from exgen.client.client import AsyncClient, Client, Result, default_address
from exgen.client.keys import CurveKeys

__all__ = ["AsyncClient", "Client", "CurveKeys", "Result", "default_address", "errors"]
