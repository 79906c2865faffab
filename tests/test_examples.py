"""The examples run (small settings), write their PNGs and show what they claim."""
from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")
from fastopt import demo  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=20_000):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) >= min_bytes, f"{path} is not a plotted PNG"


def test_trajectories_momentum_and_adaptive_beat_gradient_descent(tmp_path, capsys, monkeypatch):
    module = demo.load_example("trajectories")
    figures = []
    real_plot = module.plot
    monkeypatch.setattr(module, "plot", lambda *a: figures.append(real_plot(*a)) or figures[-1])
    r = module.main(["--out", str(tmp_path)])
    assert_png(tmp_path / "trajectories.png")
    assert "wrote" in capsys.readouterr().out
    fig, = figures
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert len(axes) == 2
    for ax in axes:                                     # both panels say what x and y are
        assert ax.get_xlabel().startswith("x") and ax.get_ylabel().startswith("y")
    problems = [k for k in r if k != "png"]
    assert len(problems) == 2
    for title in problems:
        final, initial = r[title]["final"], r[title]["initial"]
        assert all(f < initial for f in final.values()), title
        gd = final["gradient descent"]
        momentum = next(v for k, v in final.items() if k.startswith("momentum"))
        assert momentum < gd / 10, f"{title}: momentum {momentum} vs GD {gd}"
        assert final["Adam"] < gd / 100, f"{title}: Adam {final['Adam']} vs GD {gd}"


def test_numpy_mlp_trains_with_every_optimizer(tmp_path):
    r = demo.load_example("numpy_mlp").run(str(tmp_path), steps=150, hidden=16)
    assert_png(tmp_path / "numpy_mlp.png")
    assert set(r["final_loss"]) == {"SGD", "momentum", "Nesterov", "Adagrad", "RMSprop", "Adam"}
    for name, loss in r["final_loss"].items():
        assert loss < 0.8 * r["first_loss"][name], name
    assert r["final_loss"]["Adam"] < r["final_loss"]["SGD"]


def test_torch_digits_fastopt_flat_follows_torch_adam(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = demo.load_example("torch_digits").run(str(tmp_path), epochs=2, hidden=32, layers=2,
                                                  lr=5e-3)
        assert torch.get_num_threads() == 2          # 1 while training, then restored
    finally:
        torch.set_num_threads(threads)
    assert_png(tmp_path / "torch_digits.png")
    for name, loss in r["final_loss"].items():
        assert loss < 0.5 * r["first_loss"], name
    assert r["max_loss_gap"] < 1e-4                     # the same loss curve
    assert min(r["accuracy"].values()) > 0.8
    assert set(r["step_ms"]) == {"torch.optim.Adam", "torch.optim.Adam(fused=True)",
                                 "fastopt.torch.Adam(flat=True)"}


def test_demo_quick_writes_pngs_and_skips_what_is_missing(tmp_path, capsys, monkeypatch):
    assert demo.main(["--quick", "--out", str(tmp_path), "--only", "trajectories",
                      "--only", "numpy_mlp"]) == 0
    out = capsys.readouterr().out
    assert "[trajectories]" in out and "[numpy_mlp]" in out
    assert f"fastopt demo: wrote 2 of 2 pictures to {tmp_path} in" in out
    assert_png(tmp_path / "trajectories.png")
    assert_png(tmp_path / "numpy_mlp.png")
    monkeypatch.setitem(demo.NEEDS, "torch_digits", ("a_module_that_is_not_installed",))
    assert demo.main(["--quick", "--out", str(tmp_path), "--only", "torch_digits"]) == 0
    out = capsys.readouterr().out
    assert "skipped: needs a_module_that_is_not_installed" in out
    assert "pip install a_module_that_is_not_installed" in out and "fastopt[examples]" in out
    assert "wrote 0 of 1 pictures" in out and "torch_digits skipped" in out
    with pytest.raises(ValueError, match="unknown example"):
        demo.load_example("nope")


def test_demo_says_where_an_example_failed_and_what_a_missing_package_is(tmp_path, capsys,
                                                                          monkeypatch):
    import types

    def broken(out_dir, **kw):
        raise AttributeError("module 'torch.optim' has no attribute 'optimizer'")

    def needs_more(out_dir, **kw):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    fakes = {"trajectories": broken, "numpy_mlp": needs_more}
    monkeypatch.setattr(demo, "load_example", lambda name: types.SimpleNamespace(run=fakes[name]))
    rc = demo.main(["--out", str(tmp_path), "--only", "trajectories", "--only", "numpy_mlp"])
    out = capsys.readouterr().out
    assert rc == 1                                      # a failure is not a skip
    assert "[trajectories] failed: AttributeError: module 'torch.optim'" in out
    assert "(at tests/test_examples.py:" in out         # the file and line it failed at
    assert "[numpy_mlp] skipped: No module named 'scipy'; pip install scipy" in out
    assert "wrote 0 of 2 pictures" in out and "trajectories failed" in out


def test_lowbit_training_quick_trains_every_state_format(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    import importlib.util

    import numpy as np

    path = demo.examples_dir() / "lowbit_training.py"
    spec = importlib.util.spec_from_file_location("_fastopt_example_lowbit_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = []
    real_run = module.run
    monkeypatch.setattr(module, "run",
                        lambda *a, **kw: results.append(real_run(*a, **kw)) or results[-1])
    png = tmp_path / "lowbit.png"
    assert module.main(["--quick", "--out", str(png)]) == 0
    assert_png(png)
    out = capsys.readouterr().out
    assert "float32" in out and "bfloat16" in out and "int8" in out and f"wrote {png}" in out
    r, = results
    assert set(r["final"]) == {"float32", "bfloat16", "int8"}
    for fmt, losses in r["losses"].items():
        assert len(losses) == r["settings"]["steps"] and np.all(np.isfinite(losses)), fmt
        assert r["final"][fmt] < 0.8 * r["first_loss"][fmt], fmt      # it trained
        assert r["accuracy"][fmt] > 0.5, fmt
    assert r["int8_params"] > 0                              # int8 codes really used
    bpp = r["bytes_per_param"]
    assert bpp["float32"] == 8.0 and bpp["bfloat16"] == 4.0 and bpp["int8"] < 3.0


def test_optimizer_in_backward_example_frees_the_gradients(capsys):
    """examples/optimizer_in_backward.py at a small size (4 x 1024^2 params, 16 MB of
    gradients): with in_backward=True the step's peak over params + state is at least half
    the gradients' size lower than stepping after backward."""
    pytest.importorskip("torch")
    import importlib.util

    path = demo.examples_dir() / "optimizer_in_backward.py"
    spec = importlib.util.spec_from_file_location("_fastopt_example_in_backward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--width", "1024", "--layers", "4", "--steps", "2", "--batch", "8", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "in_backward saves" in out
    after = [r for r in rows if r["mode"] == "after_backward"]
    inside = [r for r in rows if r["mode"] == "in_backward"]
    assert len(after) == len(inside) == 1
    grad_mb = after[0]["grad_mb"]
    for a, b in zip(after, inside):
        assert a["peak_above_model_mb"] >= 0.9 * grad_mb, a          # every gradient at once
        assert b["peak_above_model_mb"] <= a["peak_above_model_mb"] - 0.5 * grad_mb, (a, b)


def test_optimizers_compared_quick_trains_all_three(tmp_path, capsys):
    """examples/optimizers_compared.py --quick: AdamW, Muon + AdamW and schedule-free AdamW
    each train the digits MLP (the loss falls well below its start, accuracy well above
    chance) and the PNG is written."""
    pytest.importorskip("sklearn")
    import importlib.util

    import numpy as np

    path = demo.examples_dir() / "optimizers_compared.py"
    spec = importlib.util.spec_from_file_location("_fastopt_example_optimizers_compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    png = tmp_path / "compared.png"
    r = module.run(str(png), steps=300, hidden=64)
    assert_png(png)
    assert set(r["results"]) == set(module.NAMES)
    for name, res in r["results"].items():
        losses = res["losses"]
        assert np.all(np.isfinite(losses)), name
        assert res["final"] < 0.5 * losses[:20].mean(), name        # it trained
        assert res["accuracy"] > 0.8, name
