"""Scripts run by other frameworks' interpreters for `make bench-compare`; never imported."""
