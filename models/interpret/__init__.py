"""Interpretation of SAE units: selectivity, permutation statistics, labels, attribution."""

from models.interpret.attribution import (
    Attribution,
    ablation_attribution,
    agreement,
    attribute,
    compare_methods,
    gradient_attribution,
    integrated_gradients,
    tile_rows,
)
from models.interpret.labels import (
    LabelConfig,
    LabellingResult,
    SelectivityTable,
    Variable,
    analyse_selectivity,
    label_units,
    mark_reproduced,
    match_units,
    read_units_json,
    run_labelling,
    trial_activations,
    units_document,
    write_units_json,
)
from models.interpret.selectivity import categorical_selectivity, direction_tuning
from models.interpret.stats import bh_fdr, permutation_test, permuted_labels

__all__ = [
    "Attribution",
    "LabelConfig",
    "LabellingResult",
    "SelectivityTable",
    "Variable",
    "ablation_attribution",
    "agreement",
    "analyse_selectivity",
    "attribute",
    "bh_fdr",
    "categorical_selectivity",
    "compare_methods",
    "direction_tuning",
    "gradient_attribution",
    "integrated_gradients",
    "label_units",
    "mark_reproduced",
    "match_units",
    "permutation_test",
    "permuted_labels",
    "read_units_json",
    "run_labelling",
    "tile_rows",
    "trial_activations",
    "units_document",
    "write_units_json",
]
