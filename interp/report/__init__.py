"""Self-contained Plotly HTML reports; ``python -m interp.report STORE... --out FILE.html`` links them per sample."""

from interp.report.linked import write_linked_report
from interp.report.sweep import ground_truth_score, tower_figure, write_sweep_report

__all__ = ["ground_truth_score", "tower_figure", "write_linked_report", "write_sweep_report"]
