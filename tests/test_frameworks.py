"""fastopt.torch with ``flat=True`` inside training frameworks that own ``.grad``: the
Hugging Face ``Trainer`` (a tiny GPT-2 built from a config, no downloads; it calls
``model.zero_grad()``, which sets every gradient to None, and saves the model with
safetensors) and Lightning (``optimizer.step(closure)``, its own checkpoints).

Each: train, checkpoint mid-run, resume in a fresh trainer with a fresh model and
optimizer, and end bit for bit where the uninterrupted run ends; and the same run with
``torch.optim.AdamW`` ends within float32 rounding of fastopt's. Optional test
dependencies: each test skips, saying so, without its framework.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed: fastopt.torch is not tested")
import fastopt.torch as ft  # noqa: E402

STEPS, SAVE_AT, LR = 6, 3, 3e-3


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _rel(a, b):
    return float((a - b).norm() / max(b.norm(), 1e-30))


# -- Hugging Face Trainer -------------------------------------------------------------------
def _import_transformers():
    # transformers imports the Hugging Face "kernels" package when it finds one; from the
    # repo root it would find fastopt's own top-level kernels/ folder (installed as
    # fastopt.kernels) and fail. Hide that folder while transformers' modules import.
    blocked = "kernels" not in sys.modules
    if blocked:
        sys.modules["kernels"] = None      # import of "kernels" raises ImportError
    try:
        transformers = pytest.importorskip("transformers", reason="transformers not installed: "
                                           "the HF Trainer test is skipped")
        from transformers import Trainer, TrainingArguments  # noqa: F401
        from transformers.models.gpt2 import modeling_gpt2  # noqa: F401
        return transformers
    finally:
        if blocked and sys.modules.get("kernels", 0) is None:
            del sys.modules["kernels"]


def _gpt2():
    transformers = _import_transformers()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randint(0, 97, (n, length), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _hf_run(tmp, make_opt, steps=STEPS, resume=None, save=False):
    transformers = _import_transformers()
    model = _gpt2()
    opt = make_opt(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=8, learning_rate=LR,
        save_strategy="steps" if save else "no", save_steps=SAVE_AT, logging_steps=1, report_to=[],
        use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        lr_scheduler_type="linear", warmup_steps=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume)
    return model, opt


def test_hf_trainer_flat_trains_checkpoints_and_resumes(tmp_path):
    fastopt_flat = lambda m: ft.AdamW(m.parameters(), lr=LR, flat=True)  # noqa: E731
    torch_adamw = lambda m: torch.optim.AdamW(m.parameters(), lr=LR)      # noqa: E731
    full, opt = _hf_run(tmp_path / "full", fastopt_flat, save=True)
    assert opt._flat_buffers, "flat=True was used"
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    resumed, _ = _hf_run(tmp_path / "resumed", fastopt_flat, resume=str(ckpt))
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    lists, _ = _hf_run(tmp_path / "lists", lambda m: ft.AdamW(m.parameters(), lr=LR))
    reference, _ = _hf_run(tmp_path / "torch", torch_adamw)
    init = _params(_gpt2())
    for a, b, c, d in zip(full.parameters(), reference.parameters(), init, lists.parameters()):
        assert not torch.equal(a, c)                                      # it trained
        assert torch.equal(a, d)                                          # flat = lists, exactly
        # Against torch: within an lr-sized tolerance, not relative: the key part of
        # c_attn.bias gets gradients that are rounding noise (attention is invariant to
        # it), which Adam scales up to +-lr steps in both runs, in their own directions.
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5)


# -- Lightning ---------------------------------------------------------------------------------
def _lightning_module(flat):
    L = pytest.importorskip("lightning", reason="lightning not installed: the Lightning test is skipped")

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            if flat is None:
                return torch.optim.AdamW(self.parameters(), lr=LR)
            return ft.AdamW(self.parameters(), lr=LR, flat=flat)

    return Regression()


def _loader():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(48, 6, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    # One batch an epoch: Lightning resumes a checkpoint saved when fit() stopped as an
    # unfinished epoch and replays batches in another order (for torch.optim too), so
    # with one batch the order cannot differ and resuming must be exact.
    return torch.utils.data.DataLoader(ds, batch_size=48, shuffle=False)


def _lightning_fit(module, steps, ckpt_path=None, save_dir=None):
    import lightning as L
    callbacks = []
    if save_dir is not None:         # a checkpoint at each epoch's end (3 steps an epoch)
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=save_dir, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=save_dir is not None, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer


def test_lightning_flat_trains_checkpoints_and_resumes(tmp_path):
    full = _lightning_module(True)
    _lightning_fit(full, STEPS)
    half = _lightning_module(True)
    trainer = _lightning_fit(half, SAVE_AT)
    path = os.path.join(tmp_path, "half.ckpt")
    trainer.save_checkpoint(path)
    resumed = _lightning_module(True)
    _lightning_fit(resumed, STEPS, ckpt_path=path)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    reference = _lightning_module(None)
    _lightning_fit(reference, STEPS)
    for a, b in zip(full.parameters(), reference.parameters()):
        assert _rel(a.detach(), b.detach()) <= 1e-5
    assert not np.allclose(full.net[0].weight.detach().numpy(), _lightning_module(True).net[0].weight.detach().numpy())


# -- accelerate ------------------------------------------------------------------------------
def test_accelerate_flat_prepare_save_state_and_resume(tmp_path):
    """accelerate (CPU): ``prepare`` moves the model after the optimizer was built and wraps
    the optimizer; ``save_state`` writes the model with safetensors and the optimizer's
    state dict; a fresh run that ``load_state``s resumes bit for bit."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate not installed: its test is skipped")

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 1))
        opt = ft.AdamW(model.parameters(), lr=LR, flat=True)
        acc = accelerate.Accelerator(cpu=True)
        model, opt = acc.prepare(model, opt)
        return acc, model, opt

    def train(acc, model, opt, steps):
        for s in steps:
            g = torch.Generator().manual_seed(s)
            x = torch.randn(16, 6, generator=g)
            opt.zero_grad()
            acc.backward(torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin()))
            opt.step()

    acc, full, opt = setup()
    train(acc, full, opt, range(6))
    acc, half, opt = setup()
    train(acc, half, opt, range(3))
    acc.save_state(str(tmp_path / "state"))
    acc, resumed, opt = setup()
    acc.load_state(str(tmp_path / "state"))
    train(acc, resumed, opt, range(3, 6))
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
