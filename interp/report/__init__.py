"""Self-contained Plotly HTML reports."""

from interp.report.sweep import ground_truth_score, tower_figure, write_sweep_report

__all__ = ["ground_truth_score", "tower_figure", "write_sweep_report"]
