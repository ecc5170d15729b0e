"""Figures drawn from result CSVs (matplotlib, Agg)."""
