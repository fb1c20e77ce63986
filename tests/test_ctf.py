"""CTF: codebook clustering, the lookup contract, stage 1 (coarse AR), stage 2 (one-pass fine), the pair."""

from __future__ import annotations

import math

import pytest
import torch

from raygen.models import build_model
from raygen.models.ctf import CTFPair, Lookup, cluster_codebook, lookup_fingerprint

V, K, GRID, CLASSES = 48, 6, 4, 3


def _codebook(seed=0):
    """V vectors in K tight, well-separated blobs (8 per blob), shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, 5, generator=g) * 10
    blob = torch.arange(V) % K
    x = centres[blob] + 0.1 * torch.randn(V, 5, generator=g)
    return x, blob


def _stage(stage, lookup, **kw):
    arch = dict(vocab_size=V, num_classes=CLASSES, grid_size=GRID, clusters=K, dim=32, n_layer=2, n_head=2,
                lookup_fingerprint=lookup.fingerprint(), **kw)
    model = build_model("ctf", "debug" if stage == 1 else "aux-debug", **arch)
    model.bind_lookup(lookup)
    return model


@pytest.fixture(scope="module")
def lookup():
    return cluster_codebook(_codebook()[0], K, seed=0)


# --- clustering ------------------------------------------------------------------------------


def test_kmeans_lookup_is_deterministic_for_a_seed_and_recovers_blobs(lookup):
    x, blob = _codebook()
    again = cluster_codebook(x, K, seed=0)
    assert torch.equal(again.fine_to_coarse, lookup.fine_to_coarse)
    assert torch.equal(again.representative, lookup.representative)
    assert again.fingerprint() == lookup.fingerprint()
    # The blobs are the clusters: two fine ids share a coarse id iff they share a blob.
    same_coarse = lookup.fine_to_coarse[:, None] == lookup.fine_to_coarse[None, :]
    assert torch.equal(same_coarse, blob[:, None] == blob[None, :])


def test_every_fine_id_maps_to_exactly_one_coarse_id(lookup):
    f2c = lookup.fine_to_coarse
    assert f2c.shape == (V,) and f2c.dtype == torch.int64
    assert int(f2c.min()) == 0 and int(f2c.max()) == K - 1
    assert torch.bincount(f2c, minlength=K).min() > 0  # every coarse id has members
    # Coarse ids are numbered by their smallest member; representatives are members.
    firsts = [int((f2c == c).nonzero()[0]) for c in range(K)]
    assert firsts == sorted(firsts)
    assert torch.equal(f2c[lookup.representative], torch.arange(K))


def test_representative_is_the_member_nearest_the_centroid(lookup):
    x, _ = _codebook()
    for c in range(K):
        members = (lookup.fine_to_coarse == c).nonzero().flatten()
        centre = x[members].mean(0)
        nearest = members[(x[members] - centre).pow(2).sum(1).argmin()]
        assert int(lookup.representative[c]) == int(nearest)


def test_clustering_refuses_more_clusters_than_distinct_vectors():
    x = torch.tensor([[0.0], [1.0], [1.0], [2.0]])
    with pytest.raises(ValueError, match="3 distinct vectors"):
        cluster_codebook(x, 4, seed=0)
    with pytest.raises(ValueError, match="clusters must lie in"):
        cluster_codebook(x, 0)


def test_fingerprint_tracks_the_tables(lookup):
    f2c = lookup.fine_to_coarse.clone()
    f2c[[0, 1]] = f2c[[1, 0]]
    assert lookup_fingerprint(f2c, lookup.representative) != lookup.fingerprint() or torch.equal(
        f2c, lookup.fine_to_coarse)


# --- stage 1 ----------------------------------------------------------------------------------


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(V, (n, GRID, GRID), generator=g), "label": torch.randint(CLASSES, (n,), generator=g)}


def test_stage1_models_coarse_labels_of_the_fine_data(lookup):
    from raygen.models.ar import ARModel

    s1 = _stage(1, lookup).eval()
    assert s1.tok_embeddings.num_embeddings == K and s1.output.out_features == K  # K-row embedding and head
    batch = _batch()
    coarse = lookup.fine_to_coarse[batch["tokens"]]
    torch.manual_seed(0)
    out = s1(batch)
    ref = ARModel.forward(s1, {"tokens": coarse, "label": batch["label"]})
    assert torch.allclose(out["loss"], ref["loss"])


def test_stage1_alone_samples_cluster_representatives(lookup):
    s1 = _stage(1, lookup)
    g = torch.Generator().manual_seed(0)
    ids = s1.generate(torch.tensor([0, 1, 2]), cfg_scale=2.0, generator=g)
    assert ids.shape == (3, GRID, GRID)
    assert set(ids.flatten().tolist()) <= set(lookup.representative.tolist())


# --- stage 2 ----------------------------------------------------------------------------------


def test_member_pooled_embedding_is_the_mean_of_member_rows(lookup):
    s2 = _stage(2, lookup)
    coarse = torch.arange(K)[None]
    got = s2.tok_embeddings(coarse, lookup.fine_to_coarse, K)[0]  # (K, D)
    w = s2.tok_embeddings.weight
    want = torch.stack([w[lookup.fine_to_coarse == c].mean(0) for c in range(K)])
    assert torch.allclose(got, want, atol=1e-6)


def test_stage2_attends_both_ways(lookup):
    s2 = _stage(2, lookup).eval()
    torch.nn.init.normal_(s2.output.weight, std=0.02)  # the zero-initialised head would hide everything
    labels = torch.tensor([1])
    coarse = torch.zeros(1, GRID * GRID, dtype=torch.long)
    base = s2.fine_logits(coarse, labels)
    last = coarse.clone()
    last[0, -1] = 3
    first = coarse.clone()
    first[0, 0] = 3
    # A change at the last position moves the first position's logits, and vice versa.
    assert not torch.allclose(s2.fine_logits(last, labels)[0, 0], base[0, 0])
    assert not torch.allclose(s2.fine_logits(first, labels)[0, -1], base[0, -1])


def test_stage2_restriction_keeps_every_token_in_its_cluster(lookup):
    s2 = _stage(2, lookup)
    torch.nn.init.normal_(s2.output.weight, std=1.0)  # confident, arbitrary logits
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0])
    coarse = torch.randint(K, (4, GRID, GRID), generator=g)
    for top_k in (0, 1, 3):
        fine = s2.generate(labels, coarse=coarse, restrict=True, top_k=top_k, generator=g)
        assert torch.equal(lookup.fine_to_coarse[fine], coarse)
    free = s2.generate(labels, coarse=coarse, restrict=False, generator=g)
    assert not torch.equal(lookup.fine_to_coarse[free], coarse)  # without it the logits wander off
    with pytest.raises(ValueError, match="pass coarse="):
        s2.generate(labels)


def test_stage2_training_step_learns_fine_ids_from_coarse(lookup):
    torch.manual_seed(0)
    s2 = _stage(2, lookup, resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0)
    opt = torch.optim.AdamW(s2.param_groups(0.0), lr=3e-3)
    batch = _batch(n=16, seed=1)
    for _ in range(40):
        out = s2(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    # Random fine ids: the best a model can do is learn the cluster (8 members each, ln 8 = 2.08)
    # from ln 48 = 3.87 at the zero-initialised head.
    assert float(out["loss"]) < math.log(V // K) + 0.1 and float(out["in_cluster"]) > 0.95


# --- the lookup stays with the model ----------------------------------------------------------


def test_a_stage_refuses_weights_with_another_lookup(lookup):
    s1 = _stage(1, lookup)
    state = s1.state_dict()
    other = cluster_codebook(_codebook(seed=1)[0], K, seed=3)
    assert other.fingerprint() != lookup.fingerprint()
    state["fine_to_coarse"], state["representative"] = other.fine_to_coarse, other.representative
    fresh = build_model("ctf", "debug", vocab_size=V, num_classes=CLASSES, grid_size=GRID, clusters=K, dim=32,
                        n_layer=2, n_head=2, lookup_fingerprint=lookup.fingerprint())
    with pytest.raises(ValueError, match="no lookup yet"):
        fresh(_batch())
    with pytest.raises(ValueError, match=f"built for lookup {lookup.fingerprint()}"):
        fresh.load_state_dict(state)
    fresh.load_state_dict(s1.state_dict())  # its own lookup loads
    assert torch.isfinite(fresh(_batch())["loss"])


def test_pair_runs_stage1_then_stage2_and_checks_the_lookup(lookup):
    s1, s2 = _stage(1, lookup), _stage(2, lookup)
    torch.nn.init.normal_(s1.output.weight, std=1.0)
    torch.nn.init.normal_(s2.output.weight, std=1.0)
    pair = CTFPair(s1, s2)
    labels = torch.tensor([0, 2])
    fine = pair.generate(labels, cfg_scale=2.0, temperature=0.0, fine_temperature=0.0)
    coarse = s1.generate_coarse(labels, cfg_scale=2.0, temperature=0.0)
    assert torch.equal(fine, s2.generate(labels, coarse=coarse, temperature=0.0))
    assert torch.equal(lookup.fine_to_coarse[fine], coarse)
    losses = pair(_batch())
    assert torch.allclose(losses["loss"], losses["loss_stage1"] + losses["loss_stage2"])
    other = Lookup(lookup.fine_to_coarse.roll(1), lookup.representative)
    bad = build_model("ctf", "aux-debug", vocab_size=V, num_classes=CLASSES, grid_size=GRID, clusters=K, dim=32,
                      n_layer=2, n_head=2, lookup_fingerprint=other.fingerprint())
    with pytest.raises(ValueError, match="disagree on lookup_fingerprint"):
        CTFPair(s1, bad)
