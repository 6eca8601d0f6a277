"""Training dynamics of linearized networks: closed forms for the MSE loss (gradient flow,
discrete steps, heavy-ball momentum), an ODE solver for any loss, and the stable step size."""
from ntk_dynamics.dynamics.mse import (gradient_descent_mse, gradient_descent_mse_steps,
                                       momentum_flow_mse)
from ntk_dynamics.dynamics.ode import gradient_descent
from ntk_dynamics.dynamics.stability import largest_eigenvalue, max_learning_rate
from ntk_dynamics.dynamics.curves import (Comparison, Curves, Prediction, Training,
                                          UntrustedPredictionWarning, agreement_metrics,
                                          compare_curves, kernel_drift, predict_curves,
                                          sgd_hyperparameters, train_curves)

__all__ = ["Comparison", "Curves", "Prediction", "Training", "UntrustedPredictionWarning",
           "agreement_metrics", "compare_curves", "gradient_descent", "gradient_descent_mse",
           "gradient_descent_mse_steps", "kernel_drift", "largest_eigenvalue",
           "max_learning_rate", "momentum_flow_mse", "predict_curves", "sgd_hyperparameters",
           "train_curves"]
