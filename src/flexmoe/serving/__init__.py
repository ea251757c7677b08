"""`flexmoe serve`: an OpenAI-compatible HTTP server where every request chooses its experts.

ledger (the hash chain's rules) → db (tenants, revocations, usage counters, the ledger, in SQLite
or PostgreSQL) → tenants (keys) → schema (request shapes) → engine (continuous batching) →
server (model, consent, revocations, limits, metrics) → app (FastAPI routes behind the
key-and-body guard). The names most callers need are re-exported here.
"""

# re-exported lazily (PEP 562): `flexmoe ledger` needs the ledger, not torch and FastAPI
_WHERE = {
    "create_app": "app",
    "Limits": "engine",
    "summarize_ledger": "ledger",
    "Server": "server",
    "Keys": "tenants",
    "key_hash": "tenants",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'flexmoe.serving' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"flexmoe.serving.{_WHERE[name]}"), name)
