"""Lightning callbacks: capture snapshots during fit, attribute on fit end."""
from .attribution import AttributionCallback
from .checkpoint_capture import CheckpointCapture

__all__ = ["AttributionCallback", "CheckpointCapture"]
