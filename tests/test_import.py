"""`raygen models import`: released checkpoints in, through the command, to the official outputs.

Known answers: the tiny official fixtures (tests/fixtures/*_tiny_official.pt, made by the
make_*_official.py scripts from each paper's own code) hold a checkpoint in the container the
official training saves and that code's outputs on fixed inputs. Each is imported here the way
a user imports a released file, and the imported model must give the same outputs.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from raygen.config import load_config
from raygen.errors import UserError
from raygen.platform import tracking
from raygen.platform.evaluate.sampling import load_export
from raygen.platform.imports import import_generator
from tests.test_shards import make_dataset

FIXTURES = Path(__file__).parent / "fixtures"
TOL = dict(atol=1e-5, rtol=1e-5)


def official(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}_tiny_official.pt", weights_only=True)


@pytest.fixture
def ids_data(tmp_path):
    return make_dataset(tmp_path / "ids")  # real digits, 8x8 grid, 16 palette ids, 10 classes


def test_an_imported_llamagen_checkpoint_samples_and_gives_the_official_logits(run_cli, tmp_path, ids_data):
    f = official("ar")
    ckpt = tmp_path / "c2i_tiny.pt"
    raw = {k: v + 1.0 for k, v in f["checkpoint"]["model"].items()}
    torch.save({"model": raw, "ema": f["checkpoint"]["model"], "steps": 10}, ckpt)  # train_c2i.py --ema's layout
    work = tmp_path / "work"
    code, out, err = run_cli("models", "--workdir", str(work), "import", "ar", str(ckpt), "--name", "tiny-gpt",
                             "--alias", "official", "--data", str(ids_data), "--size", "debug", "model.arch.n_head=2")
    assert code == 0, err
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert out.splitlines()[0] == f"imported ar debug (134,144 parameters) from {ckpt} ['ema'], sha256 {digest[:16]}"
    assert out.splitlines()[1].endswith(": models:/tiny-gpt@official")

    uri = tracking.tracking_uri(str(work))
    version = tracking.registered_version(uri, "models:/tiny-gpt@official")
    assert version.tags["raygen.import.sha256"] == digest
    local, run_id = tracking.resolve_model(uri, "models:/tiny-gpt@official")
    run = tracking.get_run(uri, run_id)
    assert run.data.params["import.sha256"] == digest and run.data.tags["raygen.family"] == "ar"
    model, meta = load_export(local)
    assert meta["imported"]["entry"] == "ema" and meta["weights"] == "ema"
    assert meta["data"]["class_names"] == [str(i) for i in range(10)]
    with torch.no_grad():
        logits = model.logits_uncached(f["tokens"][:, :-1], labels=f["labels"])  # row j predicts x_j
    torch.testing.assert_close(logits, f["logits"], **TOL)

    png = tmp_path / "s.png"
    code, out, err = run_cli("sample", "models:/tiny-gpt@official", f"workdir={work}", "--out", str(png),
                             "sample.labels=3,5", "--per-label", "2")
    assert code == 0, err
    from PIL import Image

    assert png.is_file() and Image.open(png).size[0] > 0


def _import(tmp_path, family: str, checkpoint: dict, overrides: list[str], data=None, size: str | None = "debug"):
    path = tmp_path / f"{family}.pt"
    torch.save(checkpoint, path)
    cfg = load_config(None, [f"workdir={tmp_path}", *overrides])
    state, meta, what, entry = import_generator(cfg, family, str(path), size=size,
                                                data_dir=str(data) if data else None)
    from raygen.models import build_model

    model = build_model(family, meta["size"], **meta["arch"]).eval()
    model.load_state_dict(state)
    return model, meta, entry


def test_an_imported_arpg_checkpoint_gives_the_official_logits(tmp_path, ids_data):
    f = official("arpg")
    model, meta, entry = _import(tmp_path, "arpg", f["checkpoint"], ["model.arch.n_head=2"], ids_data)
    assert entry == "model" and meta["arch"]["dim"] == f["config"]["dim"]
    with torch.no_grad():
        logits = model.teacher_forced_logits(f["tokens"], labels=f["labels"], order=f["order"])
    torch.testing.assert_close(logits, f["logits"], **TOL)


def test_an_imported_nar_checkpoint_gives_the_official_logits(tmp_path, ids_data):
    f = official("nar")
    model, _, _ = _import(tmp_path, "nar", f["checkpoint"], ["model.arch.n_head=2"], ids_data)
    with torch.no_grad():
        logits = model.logits_uncached(f["tokens"], labels=f["labels"])
    torch.testing.assert_close(logits, f["logits"], **TOL)


def test_an_imported_emigm_checkpoint_takes_the_ema_weights_and_gives_the_official_outputs(tmp_path):
    f = official("emigm")
    c = f["config"]
    raw = {k: v + 1.0 for k, v in f["state_dict"].items()}  # MAR-style files hold both; EMA samples
    grid = c["img_size"] // c["vae_stride"]
    model, meta, entry = _import(
        tmp_path, "emigm", {"model": raw, "model_ema": f["state_dict"], "epoch": 3},
        # no data set: the pixels codec at 1x1 patches of RGB makes 3-channel tokens on a 4x4 grid
        ["tokenizer.name=pixels", "tokenizer.pixels.patch=1", f"data.image_size={grid}", "data.channels=3",
         f"model.arch.n_head={c['encoder_num_heads']}"])
    assert entry == "model_ema" and meta["weights"] == "ema"
    assert meta["data"]["num_classes"] == c["class_num"] and meta["tokenizer"]["name"] == "pixels"
    assert {k: meta["arch"][k] for k in ("dim", "depth", "buffer_size", "head_depth", "head_width", "token_dim")} == {
        "dim": c["encoder_embed_dim"], "depth": c["encoder_depth"], "buffer_size": c["buffer_size"],
        "head_depth": c["diffloss_d"], "head_width": c["diffloss_w"], "token_dim": c["vae_embed_dim"]}
    mask = f["mask"].bool()
    with torch.no_grad():
        z = model.condition(f["tokens"], mask, model.class_embedding(f["labels"]))
        head = model.diffloss.net(f["x_t"], f["t_int"], f["z_head"])
    torch.testing.assert_close(z, f["z_cond"], **TOL)
    torch.testing.assert_close(head, f["head_out"], **TOL)


# --- sizes and bad input ---------------------------------------------------------------------


def test_the_size_is_read_from_the_shapes_and_another_size_is_refused_naming_both(tmp_path):
    from raygen.models import build_model

    with torch.device("meta"):
        b = build_model("ar", "B").state_dict()
    state = {k: torch.zeros(v.shape) for k, v in b.items()}  # a GPT-B's shapes (no values needed)
    model, meta, _ = _import(tmp_path, "ar", {"model": state}, ["tokenizer.name=vq"], size=None)
    assert meta["size"] == "B" and meta["data"]["num_classes"] == 1000 and meta["data"]["vocab_size"] == 16384
    with pytest.raises(UserError, match=r"is ar B \(dim=768, n_layer=12\); ar L has dim=1024, n_layer=24"):
        _import(tmp_path, "ar", {"model": state}, ["tokenizer.name=vq"], size="L")
    with pytest.raises(UserError, match=r"has vocab_size=16384; the data set .* gives vocab_size=16"):
        _import(tmp_path, "ar", {"model": state}, [], data=make_dataset(tmp_path / "d"), size=None)


def test_a_paper_size_of_another_family_is_named(tmp_path):
    from raygen.models import build_model

    with torch.device("meta"):  # shapes only: the checks never read a value
        nar_b = build_model("nar", "B").state_dict()
    with pytest.raises(UserError, match=r"matches no named size of family ar: its layout is nar B's$"):
        _import(tmp_path, "ar", {"model": nar_b}, ["tokenizer.name=vq"], size=None)
    with pytest.raises(UserError, match=r"is not an official arpg checkpoint \(no 'head.weight' in its state dict; "
                                        r".*; its layout is nar B's$"):
        _import(tmp_path, "arpg", {"model": nar_b}, ["tokenizer.name=vq"], size=None)


def test_another_familys_file_names_its_first_mismatched_keys(tmp_path, ids_data):
    f = official("arpg")
    with pytest.raises(UserError, match=r"is not an official ar checkpoint \(not a LlamaGen c2i GPT state dict: "
                                        r"no .cls_embedding.embedding_table.weight.*; it has e.g. embeddings.weight"):
        _import(tmp_path, "ar", f["checkpoint"], [], ids_data)
    g = official("ar")
    broken = dict(g["checkpoint"]["model"])
    broken["layers.1.attention.wo.weight"] = broken["layers.1.attention.wo.weight"][:, :32]
    del broken["norm.weight"]
    with pytest.raises(UserError, match=r"does not fit ar debug: 1 missing, 0 unexpected, 1 mis-shaped keys "
                                        r"\(missing norm.weight; layers.1.attention.wo.weight is \(64, 32\), "
                                        r"ar debug has \(64, 64\)\)"):
        _import(tmp_path, "ar", {"model": broken}, ["model.arch.n_head=2"], ids_data)


def test_files_that_are_not_checkpoints_are_one_line_and_nothing_is_registered(run_cli, tmp_path, ids_data):
    work = tmp_path / "work"
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    evil = tmp_path / "evil.pt"
    torch.save({"model": Path("/x")}, evil)  # an object, not tensors: weights_only refuses to build it
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "args": {"lr": 1.0}}, wrapped)
    cases = [
        (text, r"'.*notes.txt' is not a PyTorch checkpoint \(neither torch.save's zip archive nor a pickle\)$"),
        (evil, r"'.*evil.pt' does not load with weights_only=True \(only tensors and plain containers are read, "
               r"never code\): WeightsUnpickler error: Unsupported global: GLOBAL pathlib.PosixPath"),
        (wrapped, r"'.*wrapped.pt' holds no state dict \(looked under ema, model, module, state_dict and at its "
                  r"top level; it has args, epoch\)"),
        (tmp_path / "missing.pt", r"checkpoint file '.*missing.pt' not found \(raygen never downloads weights"),
    ]
    for path, message in cases:
        code, out, err = run_cli("models", "--workdir", str(work), "import", "ar", str(path), "--name", "x",
                                 "--data", str(ids_data))
        assert code == 2 and out == "" and len(err.splitlines()) == 1, err
        assert re.match(r"raygen: error: " + message, err), err
    for family in ("ctf", "d2it"):
        code, _, err = run_cli("models", "--workdir", str(work), "import", family, str(text), "--name", "x")
        assert code == 2 and f"family {family} has no released weights to import (its paper published none); " \
                              "importable: ar, arpg, emigm, nar, kl, vq" in err
    assert not (work / "mlartifacts").exists()  # no run was made, nothing registered


# --- tokenizer weights -----------------------------------------------------------------------


def test_vq_and_kl_weights_import_and_tokenize_from_the_registry(run_cli, tmp_path):
    """A tokenizer's official-format file -> a registered version; `tokenizer.NAME.checkpoint=
    models:/...` then builds the same codec (same weights, same codes) as the file itself."""
    from raygen.models.tokenizers import KLTokenizer, VQTokenizer
    from raygen.models.tokenizers.kl import KL_SIZES, KLAutoencoder, KLCodecConfig
    from raygen.models.tokenizers.vq import VQConfig
    from raygen.platform.data.tokenize import resolve_weights

    work = tmp_path / "work"
    arch = dict(codebook_size=32, embed_dim=4, ch=32, ch_mult=(1, 2), z_channels=32, num_res_blocks=1)
    vq_file = tmp_path / "vq_tiny.pt"
    torch.save({"model": VQTokenizer(VQConfig(**arch, seed=3), image_size=8, channels=3).state_dict()}, vq_file)
    ae = KLAutoencoder(KL_SIZES["debug"])
    ae.initialize_weights(5)
    kl_file = tmp_path / "kl_tiny.ckpt"
    torch.save({"model": ae.state_dict()}, kl_file)  # MAR's kl16.ckpt layout

    vq_args = [f"tokenizer.vq.{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", "") for k, v in arch.items()]
    code, out, err = run_cli("models", "--workdir", str(work), "import", "vq", str(vq_file), "--name", "tiny-vq",
                             "--alias", "official", *vq_args)
    assert code == 0, err
    assert out.startswith("imported vq tokenizer (") and out.splitlines()[1].endswith("models:/tiny-vq@official")
    code, _, err = run_cli("models", "--workdir", str(work), "import", "vq", str(vq_file), "--name", "y")
    assert code == 2 and "is not a vq tokenizer checkpoint of tokenizer.vq's architecture: VQ tokenizer " \
                         "checkpoint" in err  # VQ-16's default architecture does not fit the tiny file
    code, out, err = run_cli("models", "--workdir", str(work), "import", "kl", str(kl_file), "--name", "tiny-kl",
                             "tokenizer.kl.size=debug")
    assert code == 0, err

    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = load_config(None, [f"workdir={work}", "tokenizer.name=vq",
                             "tokenizer.vq.checkpoint=models:/tiny-vq@official"])
    section, registry = resolve_weights(cfg)  # the registered export; its config.json brings the architecture
    assert registry["name"] == "tiny-vq" and registry["version"] == 1
    from_registry = VQTokenizer.from_config(section, image_size=16, channels=3)
    from_file = VQTokenizer(VQConfig(**arch, checkpoint=str(vq_file)), image_size=16, channels=3)
    assert torch.equal(from_registry.encode(images), from_file.encode(images))
    assert from_registry.fingerprint() == from_file.fingerprint()

    cfg = load_config(None, [f"workdir={work}", "tokenizer.name=kl", "tokenizer.kl.checkpoint=models:/tiny-kl@latest"])
    section, _ = resolve_weights(cfg)
    gray = images[..., :1]
    from_registry = KLTokenizer.from_config(section, image_size=16, channels=1)
    from_file = KLTokenizer.from_config(KLCodecConfig(size="debug", checkpoint=str(kl_file)), image_size=16, channels=1)
    torch.testing.assert_close(from_registry.encode(gray), from_file.encode(gray), atol=0, rtol=0)

    code, _, err = run_cli("sample", "models:/tiny-vq@official", f"workdir={work}", "--out", str(tmp_path / "s.png"))
    assert code == 2 and "this is an imported vq tokenizer: it tokenizes data sets " \
                         "(tokenizer.vq.checkpoint=models:/NAME@ALIAS); it does not sample" in err
