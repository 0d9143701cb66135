"""The experiments behind the notebooks, each returning a tidy table.

Every score table has one row per (task, vector, view, layer) with columns ``nll``,
``accuracy`` and ``n_prompts`` and the display label ``method`` (``schema``);
baselines that do not depend on the layer (zero-shot, ICL) have an empty layer. One module per notebook; sweeps over
layers cache each (task, layer) on its own (``runner.run_per_layer``).
``prompt_cfg=None`` means ``prompt_config(lm)``: PromptConfig's defaults with the
model preset's n_shots. Each experiment's settings are one frozen config, validated
when made (``tvlib.checks``) and part of the cache key; notebooks change fields with
``configure``.
"""

from ..cleanup import CleanupConfig
from ..detectors import DETECTOR_CLEANUP
from ..sae_views import ITOSweepConfig, SAEViewConfig
from ..steering import DETECTOR_STEERING, TASK_STEERING, SteeringConfig

from .cleanup_sweeps import (MIN_GAIN, cleanup_report, controls_report, controls_summary,
                             earliest_effective_layer, lambda_sweep, run_cleanup_sweep,
                             run_controls_sweep, run_detector_sweep, top_cleaned_features)
from .circuit_sweeps import attribution_agreement, run_circuit_sweep
from .further_experiments import choose_early_layer, run_early_layer, run_sentence_transfer
from .prompt_setup import (PromptConfig, TaskPrompts, build_task_prompts, configure,
                           model_tasks, prompt_config)
from .sae_view_sweeps import first_pursuit_features, run_ito_sweep, run_sae_view_sweep
from .schema import (AT_CLEANED_NORM, BEST_SCALED, CLEANED, CONTROL_VIEWS, DETECTOR, ICL, ITO,
                     ON_RECON, ONE_SHOT, PURSUIT_START, RANDOM, RAW, RECON, SCALED, START_VIEWS,
                     TUNED_TOP_COSINE, TUNED_TOP_ENCODING, TV, ZERO_SHOT, method_label)
from .steering_matrix import own_feature_wins, own_vs_random, run_steering_matrix
from .task_vector_sweeps import (run_task_vector_sweep, run_task_vector_variants,
                                 summarise_sweep, task_vector_sweep, tv_method)

__all__ = [
    # the columns and names of score rows (schema)
    "TV", "DETECTOR", "ZERO_SHOT", "ONE_SHOT", "ICL", "RAW", "RECON", "ON_RECON", "ITO",
    "PURSUIT_START", "CLEANED", "START_VIEWS", "method_label",
    # ... and of the controls beside a cleanup (tvlib.controls)
    "RANDOM", "SCALED", "BEST_SCALED", "AT_CLEANED_NORM", "TUNED_TOP_COSINE",
    "TUNED_TOP_ENCODING", "CONTROL_VIEWS",
    # prompts and settings
    "PromptConfig", "TaskPrompts", "build_task_prompts", "configure", "model_tasks",
    "prompt_config", "SAEViewConfig", "ITOSweepConfig", "CleanupConfig", "DETECTOR_CLEANUP",
    "SteeringConfig", "TASK_STEERING", "DETECTOR_STEERING",
    # 01 task vectors
    "task_vector_sweep", "run_task_vector_sweep", "run_task_vector_variants", "tv_method",
    "summarise_sweep",
    # 02-03 SAE views and ITO
    "run_sae_view_sweep", "run_ito_sweep", "first_pursuit_features",
    # 04-05 cleanup and detectors
    "run_cleanup_sweep", "run_detector_sweep", "lambda_sweep", "cleanup_report",
    "earliest_effective_layer", "MIN_GAIN", "top_cleaned_features", "run_controls_sweep",
    "controls_report", "controls_summary",
    # 06 steering matrix
    "run_steering_matrix", "own_feature_wins", "own_vs_random",
    # 07 feature circuits
    "run_circuit_sweep", "attribution_agreement",
    # 08 further experiments
    "choose_early_layer", "run_early_layer", "run_sentence_transfer",
]
