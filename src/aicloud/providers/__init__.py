"""Upstream providers: OpenAI-compatible services whose models the catalog offers.

`store.py` keeps them in the database (secrets sealed by `secrets.py`), `link.py` holds
each one's HTTP client, breaker (`breaker.py`) and counters while a server runs, and
`serving.py` builds the engines of the catalog's upstream models at start.
"""
