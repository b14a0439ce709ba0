"""Benchmarks that print figures (tables and JSON); never pass/fail tests."""
