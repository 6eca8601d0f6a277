"""FLOP floor of an empirical NTK, and the paper's asymptotic cost formulas.

Floor (what `floor_flops` counts), for x1 != x2, N1 = N2 = N examples, O outputs, and
O_eff = O*O (full kernel, trace_axes=()) or O (traced, trace_axes=(-1,)):

  1. forward, both sides:     2 * 2*N*M,  M = multiply-adds of one forward pass
  2. cotangents, both sides:  for each of the O outputs and each example, the
                              activation cotangent is propagated down the network:
                              2 * 2*N*O*M_bwd, where M_bwd counts every op above the first
                              parameterised op (the top dense layer's input cotangent is its
                              weight row: O*K*C, no factor N; bilinear ops such as attention
                              scores cost 2x their forward MACs: both operands).
  3. per-parameter contraction, the cheaper of two exact orders for each weight (K x C
     applied at S positions: S=1 dense, S=spatial positions of a conv, S=tokens):
       A (per-example gradients):  2 sides * N*O*K*C*(2S-1)    per-(n, o) weight gradient
                                   + 2*N1*N2*O_eff*K*C          Gram of the gradients
       B (structured, Novak et al. 2022 Sec. 4, dense rule X1 X2^T (.) G1 G2^T):
                                   2*N1*N2*S^2*K                input(-patch) Gram
                                   + 2*N1*N2*O_eff*S^2*C        cotangent Gram
                                   + 2*N1*N2*O_eff*S^2          (.) and sum over position pairs
     plus biases: in order B the bias term reuses the cotangent Gram (N1*N2*O_eff*S^2 adds, or
     summed cotangents if cheaper); in order A the summed cotangents' Gram
     (2*N1*N2*O_eff*C); LayerNorm scales/offsets and the position table likewise (their
     Jacobians are cotangents times normalised activations, or the cotangents themselves).

What the floor assumes (read it as "the cheapest known exact algorithm, at peak speed",
not a proven lower bound):
  * only multiply-adds are counted (2 FLOPs each); nonlinearities, masks, softmax,
    LayerNorm statistics, transposes and memory traffic are free;
  * x1 and x2 are processed separately (x1 != x2, no sharing);
  * no sparsity (ReLU zeros) or low-rank structure is exploited beyond the two orders above;
  * every FLOP runs at the measured large-matmul peak (small or batched matmuls never do,
    so a ratio time/floor of 1 is unattainable; 3-10x is good).
"""
from __future__ import annotations

import math

import models


def _linear_contraction(op, n, o, oe):
  """(FLOPs, order) of one weight (+ bias) contribution: the cheaper of orders A and B."""
  k, c, s = op["K"], op["C"], op["S"]
  a = 2 * n * o * k * c * (2 * s - 1) + 2 * n * n * oe * k * c
  pair = 2 * s * s if s > 1 else 1
  b = 2 * n * n * s * s * k + 2 * n * n * oe * s * s * c + n * n * oe * pair
  if op["bias"]:
    bias_grad = 2 * n * o * c * (s - 1) + 2 * n * n * oe * c   # summed cotangents, Gram
    a += bias_grad
    b += min(n * n * oe * pair, bias_grad)                     # B: reuse the cotangent Gram
  return (a, "A") if a <= b else (b, "B")


def floor_flops(name: str, cfg: dict, kind: str) -> dict:
  """FLOP floor of the (N x N) kernel of model `name` at `cfg`, with a breakdown."""
  n, o = cfg["n"], cfg["out"]
  oe = o * o if kind == "full" else o
  ops = models.flop_ops(name, cfg)
  fwd_macs = sum(op["S"] * op["K"] * op["C"] for op in ops if op["op"] == "linear")
  fwd_macs += sum(op["macs"] for op in ops if op["op"] == "bilinear")
  forward = 2 * (2 * n * fwd_macs)
  cot = 0
  contraction = 0
  choices = []
  for op in ops:
    if op["op"] == "linear":
      if op["top"]:
        cot += 2 * (2 * o * op["K"] * op["C"])
      elif not op["first"]:
        cot += 2 * (2 * n * o * op["S"] * op["K"] * op["C"])
      w, order = _linear_contraction(op, n, o, oe)
      contraction += w
      choices.append(order)
    elif op["op"] == "bilinear":
      cot += 2 * (2 * n * o * 2 * op["macs"])
    elif op["op"] == "elementwise_param":
      d, s = op["D"], op["S"]
      if op["kind"] == "scale":
        contraction += 2 * (2 * n * o * s * d) + 2 * n * n * oe * d
      elif op["kind"] == "offset":
        contraction += 2 * (n * o * (s - 1) * d) + 2 * n * n * oe * d
      else:  # additive table: its Jacobian is the cotangent itself
        contraction += 2 * n * n * oe * d
  total = forward + cot + contraction
  return {"forward": forward, "cotangents": cot, "contraction": contraction, "total": total,
          "forward_flops_per_side": 2 * n * fwd_macs, "orders": "".join(choices)}


# ----------------------------------------------------------------- paper formulas, for scaling


def paper_costs(n: int, o: int, layers: list, kind: str) -> dict:
  """Novak et al. (2022) time complexities for a fully connected net, unit constants.

  `layers` are the (K, C) of each dense layer; [FP] = sum K*C is one forward pass per
  example, P = sum K*C the parameter count (biases ignored), O_eff = O^2 (full) or O (traced):
    Jacobian contraction:   N*O*[FP] + N^2*O_eff*P
    NTK-vector products:    N^2*O*[FP]
    Structured derivatives: N*O*[FP] + N^2*O_eff*sum_l C_l + N^2*sum_l K_l
  For an L-layer width-W MLP these are N*O*L*W^2 + N^2*O^2*L*W^2,  N^2*O*L*W^2  and
  N*O*L*W^2 + N^2*O^2*L*W (+ N^2*L*W): structured derivatives replace the W^2 of the
  contraction by W, which is why they win on MLPs.
  """
  oe = o * o if kind == "full" else o
  fp = sum(k * c for k, c in layers)
  return {"JACOBIAN_CONTRACTION": n * o * fp + n * n * oe * fp,
          "NTK_VECTOR_PRODUCTS": n * n * o * fp,
          "STRUCTURED_DERIVATIVES": (n * o * fp + n * n * oe * sum(c for _, c in layers)
                                     + n * n * sum(k for k, _ in layers))}


def mlp_layers(cfg: dict) -> list:
  return [(op["K"], op["C"]) for op in models.flop_ops("mlp", cfg)]


def loglog_slope(xs, ys):
  """Least-squares slope of log(y) against log(x); None with fewer than 2 usable points."""
  pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0]
  if len(pts) < 2:
    return None
  mx = sum(p[0] for p in pts) / len(pts)
  my = sum(p[1] for p in pts) / len(pts)
  sxx = sum((p[0] - mx) ** 2 for p in pts)
  if sxx == 0:
    return None
  return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
