"""Lightning callbacks: capture snapshots (and per-example gradients) during fit, attribute on fit end."""
from .attribution import AttributionCallback
from .checkpoint_capture import CheckpointCapture
from ..core.capture import capture_projector, read_capture, tracin_from_capture
from .gradient_capture import GradientCapture

__all__ = ["AttributionCallback", "CheckpointCapture", "GradientCapture", "capture_projector", "read_capture",
           "tracin_from_capture"]
