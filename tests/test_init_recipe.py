"""`ntk-dynamics init` end to end on a tiny configuration: files, table and figures."""
import json

import pytest

from recipes import cli


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_init_recipe_writes_metrics_table_and_plots(tmp_path, capsys):
  out = tmp_path / "run"
  rc = cli.main(["init", "--n-train", "24", "--n-test", "20", "--n-search", "12",
                 "--width", "6", "--depth", "2", "--steps", "4", "--search-steps", "2",
                 "--seeds", "0", "--implementation", "jacobian_contraction",
                 "--tweaks", "default,spectral_lr,centered,scale_search",
                 "--out", str(out), "--no-progress"])
  assert rc == 0
  metrics = json.loads((out / "metrics.json").read_text())
  rows = ["default", "spectral_lr", "centered", "scale_search"]
  assert set(metrics["summary"]) == set(rows)
  for r in rows:
    assert len(metrics["per_seed"][r]) == 1
    s = metrics["per_seed"][r][0]
    assert len(s["actual_loss"]) == len(s["predicted_loss"]) == 5
    assert s["actual_loss"][0] == pytest.approx(s["predicted_loss"][0], rel=1e-5)
    assert sum(s["shares"].values()) == pytest.approx(1.0, rel=1e-6)
  # centering makes f₀ = 0 and keeps the kernel (same λ_max, same step)
  c, d = metrics["per_seed"]["centered"][0], metrics["per_seed"]["spectral_lr"][0]
  assert c["max_abs_f0"] < 1e-6 and c["learning_rate"] == pytest.approx(d["learning_rate"])
  assert metrics["per_seed"]["spectral_lr"][0]["learning_rate"] == pytest.approx(
      0.5 * metrics["per_seed"]["spectral_lr"][0]["eta_max"])
  ss, d0 = metrics["per_seed"]["scale_search"][0], metrics["per_seed"]["default"][0]
  assert metrics["summary"]["scale_search"]["kappa_reduction_vs_default_median"] == \
      pytest.approx(d0["condition_number"] / ss["condition_number"])
  for name in ("table.md", "spectra.png", "loss_curves.png", "shares.png"):
    assert (out / name).stat().st_size > 0
  assert "scale_search" in capsys.readouterr().out


def test_init_recipe_rejects_bad_arguments():
  with pytest.raises(SystemExit, match="tweaks"):
    cli.main(["init", "--tweaks", "default,magic"])
  with pytest.raises(SystemExit, match="n-search"):
    cli.main(["init", "--n-train", "10", "--n-search", "20"])
  for flag, value in (("--search-lr", "-1"), ("--w-std", "0"), ("--temperature", "-1"),
                      ("--b-std", "nan")):
    with pytest.raises(SystemExit, match=flag):
      cli.main(["init", flag, value])


def test_init_recipe_interrupted_keeps_finished_rows(tmp_path, monkeypatch):
  from recipes import init as init_recipe
  calls = []
  real = init_recipe._train

  def train_then_interrupt(*a, **kw):
    if calls:
      raise KeyboardInterrupt
    calls.append(1)
    return real(*a, **kw)

  monkeypatch.setattr(init_recipe, "_train", train_then_interrupt)
  out = tmp_path / "run"
  rc = cli.main(["init", "--n-train", "24", "--n-test", "20", "--n-search", "12",
                 "--width", "6", "--depth", "2", "--steps", "4", "--seeds", "0",
                 "--implementation", "jacobian_contraction", "--tweaks",
                 "default,spectral_lr", "--out", str(out), "--no-progress"])
  assert rc == 130
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["status"] == "interrupted"
  assert len(metrics["per_seed"]["default"]) == 1 and metrics["per_seed"]["spectral_lr"] == []
