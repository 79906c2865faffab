"""A checkpoint written mid-training and loaded in a fresh process continues bit for bit
like uninterrupted training: optimizer, LR scheduler, GradScaler and EMA together."""
import subprocess
import sys
import textwrap

import numpy as np

TRAIN = textwrap.dedent("""
    import sys
    import numpy as np
    import fastopt as fo
    from fastopt import schedules

    def build():
        rng = np.random.default_rng(0)
        flat = fo.FlatParams([rng.standard_normal(s).astype(np.float32)
                              for s in [(64, 32), (32,), (5000,), (1,)]])
        opt = fo.AdamW(flat, lr=1e-2, max_grad_norm=1.0)
        sched = schedules.OneCycleLR(opt, max_lr=0.05, total_steps=40)
        scaler = fo.GradScaler(init_scale=2.0 ** 10, growth_interval=3)
        ema = fo.EMA(flat.params, decay=0.9)
        return flat, opt, sched, scaler, ema

    def run(flat, opt, sched, scaler, ema, start, stop):
        for t in range(start, stop):
            rng = np.random.default_rng(1000 + t)          # the data depends on t only
            for g in flat.grads:
                g[...] = rng.standard_normal(g.shape).astype(np.float32) * scaler.get_scale()
            if t % 7 == 3:
                flat.grads[2][17] = np.inf                  # an overflow: the step is skipped
            scaler.step(opt)
            scaler.update()
            sched.step()
            ema.update()

    def checkpoint(opt, sched, scaler, ema):
        return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "ema": ema.state_dict()}

    def restore(parts, opt, sched, scaler, ema):
        opt.load_state_dict(parts["optimizer"])
        sched.load_state_dict(parts["scheduler"])
        scaler.load_state_dict(parts["scaler"])
        ema.load_state_dict(parts["ema"])
""")


def _run(tmp_path, body):
    script = TRAIN + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


def test_resume_in_fresh_process_is_bit_for_bit(tmp_path):
    _run(tmp_path, """
        flat, opt, sched, scaler, ema = build()
        run(flat, opt, sched, scaler, ema, 0, 40)
        np.save("uninterrupted.npy", flat.data)
        np.save("uninterrupted_ema.npy", np.concatenate([s.ravel() for s in ema.shadow]))
    """)
    _run(tmp_path, """
        flat, opt, sched, scaler, ema = build()
        run(flat, opt, sched, scaler, ema, 0, 17)
        fo.save("ckpt.npz", {"params": flat.data.copy(), **checkpoint(opt, sched, scaler, ema)})
    """)
    _run(tmp_path, """
        flat, opt, sched, scaler, ema = build()
        parts = fo.load("ckpt.npz")
        flat.data[...] = parts["params"]
        restore(parts, opt, sched, scaler, ema)
        run(flat, opt, sched, scaler, ema, 17, 40)
        np.save("resumed.npy", flat.data)
        np.save("resumed_ema.npy", np.concatenate([s.ravel() for s in ema.shadow]))
    """)
    a, b = np.load(tmp_path / "uninterrupted.npy"), np.load(tmp_path / "resumed.npy")
    assert a.tobytes() == b.tobytes()
    ea, eb = np.load(tmp_path / "uninterrupted_ema.npy"), np.load(tmp_path / "resumed_ema.npy")
    assert ea.tobytes() == eb.tobytes()
    assert not np.array_equal(a, np.load(tmp_path / "uninterrupted.npy") * 0)   # it trained
