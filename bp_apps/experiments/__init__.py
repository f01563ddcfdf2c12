"""Experiments around the engine: side-by-side comparison, benchmarks, the article's linear regression, plots."""
