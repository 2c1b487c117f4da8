"""Locust load scenarios for stockhold (issue 4): flash sales replayed over HTTP, each run ending with an
audit of the invariants against the service and PostgreSQL.

    python -m loadtests last-bottle                 # starts its own service, runs, audits, stops it
    python -m loadtests flash-100 --url http://127.0.0.1:8000   # against a running service
    python -m loadtests flash-100 --replicas 3 --workers 2      # 3 serve + 2 worker processes it starts
    python -m loadtests.audit --url ... --database-url ... --skus a,b   # the audit on its own

Modules: scenarios.py (what each scenario asks), locustfile.py + users.py (the simulated people),
checks.py (what each response may be), outcomes.py (what the users saw, handed to the audit),
service.py (a `stockhold serve` to test), deployment.py (separate serve and worker processes, and
what a run on them proves beside the audit), locust_process.py (Locust as a bounded subprocess),
audit.py (what was proven), __main__.py (the runner tying them together).
"""
