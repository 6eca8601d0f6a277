"""Training dynamics of linearized networks: closed forms for the MSE loss (gradient flow,
discrete steps, heavy-ball momentum), an ODE solver for any loss, and the stable step size."""
from ntk_dynamics.dynamics.mse import (gradient_descent_mse, gradient_descent_mse_steps,
                                       momentum_flow_mse)
from ntk_dynamics.dynamics.ode import gradient_descent
from ntk_dynamics.dynamics.stability import largest_eigenvalue, max_learning_rate

__all__ = ["gradient_descent", "gradient_descent_mse", "gradient_descent_mse_steps",
           "largest_eigenvalue", "max_learning_rate", "momentum_flow_mse"]
