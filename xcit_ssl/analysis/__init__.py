"""What a backbone learned: class-attention maps, patch-feature PCA, run curves.

- :mod:`.attention`: CLS-to-patch attention of any class-attention block, DINO's threshold masks.
- :mod:`.pca`: DINOv2-style PCA of patch tokens (foreground split, three components as RGB).
- :mod:`.sheets`: the PNG contact sheets and their documented tile layout.
- :mod:`.snapshot`: backbone + images -> sheets (shared by the command and the callback).
- :mod:`.callback`: :class:`AttentionSnapshots`, sheets during ``fit`` (imports Lightning).
- :mod:`.plot`: every metric of a run's ``metrics.csv`` in one PNG.
"""

from .attention import AttentionCapture, capture_class_attention, threshold_masks
from .pca import PatchPCA, patch_pca

__all__ = ["AttentionCapture", "PatchPCA", "capture_class_attention", "patch_pca", "threshold_masks"]
