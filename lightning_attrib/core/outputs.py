"""Output functions `(module, batch) -> (B,)` with their loss weight Q: kept as the import path of the task
protocol, which lives in `core/tasks.py` (readers, built-in tasks, `TaskOutput`, `CustomOutput`, `resolve_output`)."""
from .tasks import (BUILTIN_OUTPUTS, ClassificationMargin, CrossEntropyLoss, CustomOutput, OutputFunction,  # noqa: F401
                    TaskOutput, margin_from_logits, resolve_output)

__all__ = ["BUILTIN_OUTPUTS", "ClassificationMargin", "CrossEntropyLoss", "CustomOutput", "OutputFunction",
           "TaskOutput", "margin_from_logits", "resolve_output"]
