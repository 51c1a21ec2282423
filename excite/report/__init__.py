"""What a run reports: per-epoch metrics files, classification metrics and plots."""
from excite.report.metrics import (
                                   MetricsLogger,
                                   classification_report,
                                   confusion_matrix,
                                   format_epoch_line,
                                   topk_accuracy,
)
from excite.report.plots import plot_confusion_matrix, plot_curves

__all__ = ["MetricsLogger", "classification_report", "confusion_matrix", "format_epoch_line",
           "plot_confusion_matrix", "plot_curves", "topk_accuracy"]
