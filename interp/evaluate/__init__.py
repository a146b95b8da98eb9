"""Causal evaluation of attribution maps: metrics against boxes, masks, concepts and human attention,
and loaders for the real annotation files they are scored on."""

from interp.evaluate.annotations import (
    CHEXPERT_LABELS,
    Box,
    Fixations,
    RleMasks,
    fixation_map,
    load_chexpert_labels,
    load_egd_fixations,
    load_nih_boxes,
    load_reflacx_fixations,
    load_rsna_boxes,
    load_siim_masks,
    load_vindr_boxes,
)
from interp.evaluate.metrics import (
    auc_judd,
    auprc,
    bootstrap_ci,
    box_scores,
    box_union_mask,
    boxes_from_map,
    cc,
    concept_rank,
    concept_rank_accuracy,
    deletion_insertion,
    energy_in_mask,
    kl,
    nss,
    point_pixels,
    pointing_game,
)

__all__ = [
    "CHEXPERT_LABELS", "Box", "Fixations", "RleMasks", "auc_judd", "auprc", "bootstrap_ci", "box_scores",
    "box_union_mask", "boxes_from_map", "cc", "concept_rank", "concept_rank_accuracy", "deletion_insertion",
    "energy_in_mask", "fixation_map", "kl", "load_chexpert_labels", "load_egd_fixations", "load_nih_boxes",
    "load_reflacx_fixations", "load_rsna_boxes", "load_siim_masks", "load_vindr_boxes", "nss", "point_pixels",
    "pointing_game",
]
