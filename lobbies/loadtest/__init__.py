"""The load-test suite behind `manage.py loadtest` (docs/performance.md).

Benchmark code, not part of the product: the server never imports it.
"""
