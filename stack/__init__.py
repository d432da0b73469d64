"""The local stack's Python helpers (certs.py, secure.py), importable by the tests as ``stack``."""
