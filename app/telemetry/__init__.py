"""What the service tells its operators: Prometheus metrics (metrics.py), JSON logs (logs.py), and the
request context both read (context.py: the request id, the outcome of a reservation). No FastAPI here."""
