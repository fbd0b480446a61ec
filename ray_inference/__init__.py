"""rayinfer: distributed LLM inference on a Ray cluster whose head only coordinates."""

__version__ = "0.1.0"

# One namespace for every named actor: drivers started without it get an anonymous one and
# would never find the coordinator.
NAMESPACE = "rayinfer"
COORDINATOR_NAME = "rayinfer_coordinator"
# A custom resource only the head offers; head-side actors ask for a sliver of it.
HEAD_RESOURCE = "rayinfer_head"
