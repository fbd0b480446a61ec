"""Benchmarks that compare variants side by side in one run and print ratios."""
