"""Evaluation: metrics, judges, reports."""
