"""tokenlabel.kernels: the fused token-labeling loss (Triton) and its float64 references.

Public: ``token_label_cross_entropy``, ``TokenLabelCrossEntropy``, ``roi_align_label_maps`` (design.md),
``fused_linear_token_label_cross_entropy`` (aux head folded into the loss). ``tokenlabel.kernels.reference``
holds the float64 oracles and the reference-style eager baseline. Triton is imported only when a
kernel first runs, so this package imports without a GPU.
"""
from .loss import TokenLabelCrossEntropy, roi_align_label_maps, token_label_cross_entropy, validate_inputs
from .fused_linear import fused_linear_token_label_cross_entropy

__all__ = ["token_label_cross_entropy", "TokenLabelCrossEntropy", "roi_align_label_maps",
           "fused_linear_token_label_cross_entropy", "validate_inputs"]
