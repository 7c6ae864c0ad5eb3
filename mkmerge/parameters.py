"""Parameter settings as the merge planner reads them; they live in the shared recipe layer."""

from mksuite.common.recipe.parameters import (
    CONDITIONAL_KEYS,
    ConditionalEntry,
    ParameterSetting,
    ParameterValue,
    SettingProblem,
    evaluate_gradient,
    evaluate_setting,
    evaluate_value,
    filter_matches,
    layer_position,
    parse_setting,
    resolve_parameter,
    setting_from_raw,
)

__all__ = [
    "CONDITIONAL_KEYS",
    "ConditionalEntry",
    "ParameterSetting",
    "ParameterValue",
    "SettingProblem",
    "evaluate_gradient",
    "evaluate_setting",
    "evaluate_value",
    "filter_matches",
    "layer_position",
    "parse_setting",
    "resolve_parameter",
    "setting_from_raw",
]
