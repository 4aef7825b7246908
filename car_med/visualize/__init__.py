"""Figures a person would rather look at than read (matplotlib, Agg backend, files only)."""
