"""Helper programs that tests/test_sqlite.py runs in separate processes."""
