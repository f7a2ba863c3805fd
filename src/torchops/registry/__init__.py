"""The model registry: versions, aliases and their history over SQL and a blob store.

``Registry`` is the API; ``ArtifactStore`` the content-addressed blob store under it.
"""

from __future__ import annotations

from torchops.registry.artifacts import ArtifactStore
from torchops.registry.registry import GcReport, Registry

__all__ = ["ArtifactStore", "GcReport", "Registry"]
