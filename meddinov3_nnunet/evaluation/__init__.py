"""Segmentation metrics, tables and plots. Imports no model code."""
