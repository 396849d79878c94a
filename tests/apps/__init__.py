"""Small applications the tests run in subprocesses."""
