"""The root of exgen's error tree, in a module of its own so that ``protocol.py``
(which ``errors.py`` imports for the codes) can derive ``ValidationError`` from it
without an import cycle. Import it from :mod:`exgen.client.errors`."""

from __future__ import annotations


class ExgenError(Exception):
    """Base of every exgen error."""
