"""`flexmoe serve`: an OpenAI-compatible HTTP server where every request chooses its experts.

tenants (keys file) → schema (request shapes) → engine (batched decode) → ledger (usage
records) → server (model, consent, revocations, metrics) → app (FastAPI routes behind the
key-and-body guard). The names most callers need are re-exported here.
"""

from flexmoe.serving.app import create_app
from flexmoe.serving.engine import Limits
from flexmoe.serving.ledger import summarize_ledger
from flexmoe.serving.server import Server
from flexmoe.serving.tenants import Keys, key_hash

__all__ = ["Keys", "Limits", "Server", "create_app", "key_hash", "summarize_ledger"]
