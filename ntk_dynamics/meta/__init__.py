"""Few-shot meta-learning: MAML/ANIL and closed-form NTK inner loops, an outer loop with
checkpoints and exact resume, and per-meta-step cost measurements."""
from ntk_dynamics.meta.inner import (CLOSED_FORMS, INNER_LOOPS, InnerLoop, anil, head_names,
                                     make_inner_loop, maml, ntk_flow, ntk_ridge, ntk_steps)
from ntk_dynamics.meta.losses import accuracy, mse, xent
from ntk_dynamics.meta.profile import profile_meta_step
from ntk_dynamics.meta.train import (MetaConfig, MetaResult, check_task_batch, evaluate,
                                     mean_ci95, meta_train, model_outputs, task_metrics_fn)

__all__ = ["CLOSED_FORMS", "INNER_LOOPS", "InnerLoop", "MetaConfig", "MetaResult", "accuracy",
           "anil", "check_task_batch", "evaluate", "head_names", "make_inner_loop", "maml",
           "mean_ci95", "meta_train", "model_outputs", "mse", "ntk_flow", "ntk_ridge", "ntk_steps",
           "profile_meta_step", "task_metrics_fn", "xent"]
