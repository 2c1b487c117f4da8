"""Tenants and API keys: key format and digests (tokens.py), scopes and what each allows (scopes.py),
keys in PostgreSQL (store.py), the per-process key cache and its revocation epoch (authenticator.py,
epoch.py). No FastAPI here: app/api/ translates these errors into problem documents."""
