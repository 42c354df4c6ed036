"""Evaluation: device-side confusion matrix and AUROC, metrics, dense inference, reports.

Scoring mask folders reads masks as the data package does; matplotlib is imported only by
``plot_confusion_matrix``.
"""
from .auroc import BinnedAUROC
from .confusion import ConfusionMatrix
from .inference import model_size_divisor, predict, predict_logits, sliding_windows
from .mask_folders import MaskFolderResult, score_mask_folders, write_mask_folder_report
from .metrics import metric_value, segmentation_metrics
from .report import format_table, plot_confusion_matrix, write_json

__all__ = [
    "BinnedAUROC",
    "ConfusionMatrix",
    "format_table",
    "MaskFolderResult",
    "metric_value",
    "model_size_divisor",
    "plot_confusion_matrix",
    "predict",
    "predict_logits",
    "score_mask_folders",
    "segmentation_metrics",
    "sliding_windows",
    "write_json",
    "write_mask_folder_report",
]
