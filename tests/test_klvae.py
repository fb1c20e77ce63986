"""The vae family: KL autoencoder training (objective, critic with its own optimizer), its
export as a codec, and the two-engine step under ZeRO-2 and ZeRO-3 against plain torch."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch

from raygen.config import TrainConfig
from raygen.models.klvae import KLVAE, KLVAE_SIZES, Critic, KLVAEConfig
from raygen.models.registry import build_model
from raygen.platform.train.engine import TorchEngine
from raygen.platform.train.loop import LoopHooks, TrainState, frozen, run_steps


def _digits16(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """n real digits upscaled to 16 px, uint8 (n, 16, 16, 1), and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images[:n] * 255 / 16).astype(np.uint8))  # (n, 8, 8)
    x = x.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (n, 16, 16) nearest upscale
    return x[..., None], torch.from_numpy(d.target[:n])


def _model(**arch) -> KLVAE:
    return build_model("vae", "debug", image_size=16, image_channels=1, **arch)


def test_sizes_and_the_objective_has_its_known_terms():
    """rec + kl_weight * KL / (H*W*C) on the posterior mean (LDM's sums / pixel values)."""
    assert isinstance(KLVAE_SIZES["kl16"], KLVAEConfig)
    model = _model(sample_posterior=False, kl_weight=0.5)
    images, _ = _digits16(8)
    out = model({"images": images})
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    post = model.autoencoder.encode(x)
    x_hat = model.autoencoder.decode(post.mean)
    kl = (0.5 * (post.mean**2 + post.logvar.exp() - 1 - post.logvar)).sum(dim=(1, 2, 3)).mean()
    want = (x_hat - x).abs().mean() + 0.5 * kl / 256
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-6)
    mse = (x_hat.clamp(-1, 1) - x).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out["psnr"], (10 * torch.log10(4 / mse)).mean(), rtol=1e-5, atol=1e-5)
    assert "g_adv" not in out and "critic_batch" not in out
    with pytest.raises(ValueError, match=r"expected images \(B, 16, 16, 1\)"):
        model({"images": images[:, :8]})


def test_the_critic_sees_the_reconstruction_and_gets_no_gradient_from_the_model_loss():
    model = _model(disc_weight=0.5, disc_start=3, disc_ndf=8, disc_layers=2)
    critic = model.make_critic()
    assert isinstance(critic, Critic) and model.critic_start == 3
    assert _model(disc_weight=0.0).make_critic() is None
    images, _ = _digits16(4)
    with frozen(critic):
        out = model({"images": images}, generator=torch.Generator().manual_seed(0), critic=critic)
        out["loss"].backward()
    assert all(p.grad is None for p in critic.parameters()) and all(p.requires_grad for p in critic.parameters())
    assert model.autoencoder.decoder.conv_out.weight.grad is not None
    batch = out["critic_batch"]
    assert not batch["fake"].requires_grad and batch["real"].shape == batch["fake"].shape == (4, 1, 16, 16)
    c = critic(batch)
    assert c["loss"].requires_grad and set(c) == {"loss", "logits_real", "logits_fake"}
    # g_adv is -mean(D(x_hat)) with the critic's current weights
    torch.testing.assert_close(out["g_adv"], -critic.disc(batch["fake"]).mean(), rtol=1e-5, atol=1e-6)


def _epochs(images, labels, batch):
    def epoch_batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            yield {"images": images[idx], "label": labels[idx]}
    return epoch_batches


def test_training_with_a_critic_lowers_the_reconstruction_error_and_steps_the_critic_from_its_start():
    torch.manual_seed(0)
    images, labels = _digits16(256)
    model = _model(disc_weight=0.1, disc_start=20, disc_ndf=8, disc_layers=2)
    engine = TorchEngine(model, torch.optim.AdamW(model.param_groups(0.0), lr=2e-3), grad_clip=1.0)
    critic_module = model.make_critic()
    critic = TorchEngine(critic_module, torch.optim.AdamW(critic_module.param_groups(0.0), lr=2e-3),
                         name="critic")
    before = {k: v.clone() for k, v in critic_module.state_dict().items()}
    logs, snapshots = {}, {}

    def on_log(step, metrics):
        logs[step] = dict(metrics)
        snapshots[step] = {k: v.clone() for k, v in critic_module.state_dict().items()}

    t = TrainConfig(steps=60, lr=2e-3, warmup_steps=5, log_every=10, checkpoint_every=100, global_batch=32)
    state = TrainState(torch.Generator().manual_seed(0))
    assert run_steps(engine, state, _epochs(images, labels, 32), t, LoopHooks(on_log=on_log), critic=critic) == "done"
    assert all(torch.equal(before[k], snapshots[20][k]) for k in before)  # untouched before disc_start
    assert any(not torch.equal(before[k], snapshots[30][k]) for k in before)
    assert "train/critic_loss" not in logs[20] and "train/g_adv" not in logs[20]
    assert {"train/critic_loss", "train/critic_logits_real", "train/g_adv", "train/psnr", "train/kl"} <= set(logs[30])
    assert logs[60]["train/l1"] < 0.6 * logs[10]["train/l1"]
    assert logs[60]["train/psnr"] > logs[10]["train/psnr"] + 3


def test_flops_per_sample_counts_the_convolutions():
    """3x the forward's FLOPs: every conv's 2 * Cin * Cout * k*k * Hout * Wout, plus the attention."""
    model = _model()
    convs = []

    def count(m, inputs, out):
        convs.append(2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * out[0, 0].numel())

    for m in model.autoencoder.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(count)
    model.autoencoder(torch.zeros(1, 1, 16, 16), sample_posterior=False)
    # three attention blocks at 8x8 on 64 channels (encoder level 1, both middles): q k^T and a v
    attention = 3 * (2 * 2 * 64 * 64 * 64)
    assert model.flops_per_sample() == 3 * (sum(convs) + attention)


def test_latent_std_and_reconstruct():
    model = _model()
    images, _ = _digits16(16)
    recon = model.reconstruct(images)
    assert recon.dtype == torch.uint8 and recon.shape == images.shape
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    std = float(model.autoencoder.encode(x).mean.std())
    assert model.latent_std(images) == pytest.approx(std, rel=1e-5)


# --- two engines under ZeRO, against plain torch --------------------------------------------


def _two_engine_steps(stage: int | None, rank: int, world: int, steps: int = 3) -> dict[str, torch.Tensor]:
    """`steps` optimizer steps of model + critic on 8 fixed images (each rank its 8/world);
    stage None = plain torch on one process. Returns both modules' fp32 weights."""
    from raygen.platform.train.engine import DeepSpeedEngine, build_ds_config

    images, labels = _digits16(8)
    lo, hi = rank * 8 // world, (rank + 1) * 8 // world
    model = _model(disc_weight=0.5, disc_start=0, disc_ndf=8, disc_layers=2, disc_norm="group",
                   sample_posterior=False)
    critic_module = model.make_critic()
    # SGD: Adam would blow up the rounding noise of gradients that are ~0 (conv biases before a
    # per-channel GroupNorm) into lr-sized steps, and the comparison would test nothing
    opt = torch.optim.SGD(model.param_groups(0.0), lr=0.05)
    copt = torch.optim.SGD(critic_module.param_groups(0.0), lr=0.05)
    if stage is None:
        engine = TorchEngine(model, opt, grad_clip=1.0)
        critic = TorchEngine(critic_module, copt, grad_clip=1.0, name="critic")
    else:
        ds = build_ds_config(global_batch=8, micro_batch=None, world=world, stage=stage, bf16=False, grad_clip=1.0)
        engine = DeepSpeedEngine(model, opt, ds)
        critic = DeepSpeedEngine(critic_module, copt, ds, name="ds_critic")
    t = TrainConfig(steps=steps, lr=0.05, warmup_steps=0, log_every=100, checkpoint_every=100, global_batch=8)

    def epoch_batches(epoch):
        yield from [{"images": images[lo:hi], "label": labels[lo:hi]}] * steps

    run_steps(engine, TrainState(torch.Generator().manual_seed(0)), epoch_batches, t, critic=critic)
    return {**engine.fp32_state_dict(), **{f"critic.{k}": v for k, v in critic.fp32_state_dict().items()}}


def _zero_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    # ZeRO-1 is ZeRO-2 without gradient partitioning; 0, 2 and 3 are the distinct code paths
    results = {stage: _two_engine_steps(stage, rank, world) for stage in (0, 2, 3)}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without C++ teardown: DeepSpeed's shared-memory comm threads can abort a process at
    # interpreter exit ("terminate called without an active exception") after the work is done.
    os._exit(0)


def test_model_and_critic_step_together_under_every_zero_stage_as_in_plain_torch(tmp_path):
    """Two ranks, each with half the batch, two DeepSpeed engines (model, critic): after 3 steps
    both modules' weights equal one plain-torch process on the whole batch, at ZeRO 0, 2, 3."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "zero.pt"
    torch.multiprocessing.spawn(_zero_worker, args=(2, port, str(out)), nprocs=2, join=True)
    reference = _two_engine_steps(None, 0, 1)
    results = torch.load(out, weights_only=True)
    assert sorted(results) == [0, 2, 3]
    for stage, got in results.items():
        assert set(got) == set(reference)
        for name, want in reference.items():
            torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=lambda m: f"ZeRO-{stage} {name}: {m}")
    start = _model(disc_weight=0.5, disc_ndf=8, disc_layers=2, disc_norm="group")
    moved = [k for k, v in start.state_dict().items() if not torch.allclose(v, reference[k], atol=1e-4)]
    assert len(moved) > 0.5 * len(reference) / 2  # the steps changed most weights: the comparison is not vacuous
    assert not math.isnan(sum(float(v.sum()) for v in reference.values()))


class _Shift(torch.nn.Module):
    """A stand-in codec model whose reconstruction is the image plus a constant."""

    def __init__(self, delta: int):
        super().__init__()
        self.delta = delta

    def reconstruct(self, images):
        return (images.int() + self.delta).clamp(0, 255).to(torch.uint8)


def test_reconstruction_metrics_have_known_answers():
    from raygen.models.classifier import to_input
    from raygen.models.inception import FIDInceptionV3
    from raygen.platform.evaluate.digits import train_classifier
    from raygen.platform.train.driver import reconstruction_metrics

    images, labels = _digits16(64)
    images = images.clamp(0, 250)  # a shift of 5 stays exact
    clf, _ = train_classifier(epochs=1)
    torch.manual_seed(0)
    inception = FIDInceptionV3().state_dict()
    same = reconstruction_metrics(_Shift(0), images, labels, digits=clf)
    assert same["eval/l1"] == 0 and same["eval/psnr"] == pytest.approx(10 * math.log10(4 / 1e-10))
    assert abs(same["eval/fd_digits"]) < 1e-6
    assert same["eval/class_acc"] == pytest.approx(float((clf(to_input(images)).argmax(1) == labels).float().mean()))
    few = images[:6]  # Inception at 299 px is the slow part
    assert abs(reconstruction_metrics(_Shift(0), few, labels[:6], inception=inception)["eval/rfid"]) < 1e-6
    from raygen.platform.evaluate.metrics import Extractors, feature_stats, frechet_distance

    pools = [Extractors(inception_state=inception)(x)["inception_pool"] for x in (few, _Shift(40).reconstruct(few))]
    want = frechet_distance(*feature_stats(pools[0]), *feature_stats(pools[1]))
    got = reconstruction_metrics(_Shift(40), few, labels[:6], inception=inception)["eval/rfid"]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    shifted = reconstruction_metrics(_Shift(5), images, labels)
    # every pixel off by 5 levels = 10/255 in [-1, 1]: L1 = 10/255, PSNR = 10 log10(4 / (10/255)^2)
    assert shifted["eval/l1"] == pytest.approx(10 / 255, rel=1e-5)
    assert shifted["eval/psnr"] == pytest.approx(10 * math.log10(4 / (10 / 255) ** 2), rel=1e-5)
    assert set(shifted) == {"eval/psnr", "eval/l1"}


def test_the_perceptual_term_enters_the_loss_only_when_attached_and_stays_outside_the_module():
    from raygen.models.tokenizers.ae_losses import Perceptual

    torch.manual_seed(0)
    model = _model(sample_posterior=False, perceptual_weight=0.7)
    images, _ = _digits16(4)
    plain = model({"images": images})
    lpips = Perceptual()
    model.attach_perceptual(lpips)
    out = model({"images": images})
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    x_hat = model.autoencoder.decode(model.autoencoder.encode(x).mean)
    want = lpips(x, x_hat).mean()
    torch.testing.assert_close(out["perceptual"], want.detach())
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.7 * want, rtol=1e-5, atol=1e-6)
    assert not any(n.startswith("perceptual") for n in model.state_dict())  # no export, no optimizer sees it
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in _model().parameters())
