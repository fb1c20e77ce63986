"""Family `ctf`: coarse-to-fine token prediction (CTF, arXiv 2503.16194).

The tokenizer's codebook (V entries) is clustered with k-means into K groups, which gives a
fine -> coarse lookup. Generation then takes two models:

- stage 1 (sizes `debug`, `B`, `L`, `XL`): LlamaGen's raster AR over the K coarse labels. It is
  the `ar` model with an embedding and a head of K rows, so at K=512 on the VQ-16 codebook the
  sizes come to 87M / 310M / 734M (the paper's counts) instead of 111M / 343M / 775M.
- stage 2 (sizes `aux-debug`, `aux-B`, `aux-L`, `aux-XL`): a bidirectional transformer that
  reads [class token, all N coarse labels] and predicts all N fine ids in one forward pass.

`CTFPair` joins a trained stage 1 and stage 2 into one generator: N cached AR passes and then
one stage-2 pass.

The paper has no public code; the choices marked [I] below are raygen's:

- [I] k-means on the codebook vectors as the tokenizer gives them (VQ codes l2-normalised,
  palette entries in pixel units), Euclidean distance, k-means++ seeded, and the cluster ids
  renumbered by their smallest member so the lookup does not depend on k-means' labelling.
- [I] Stage 2 embeds a coarse label as the mean of the embeddings of its cluster's fine ids
  (`tok_embeddings` has V rows, "member pooling"). That matches the paper's aux sizes
  (111M / 343M / 775M, the counts of LlamaGen-B/L/XL with a V-row input table) and keeps stage
  2's parameter shapes independent of K.
- [I] Stage 2 trains with plain cross-entropy over all V ids (teacher-forced on the true
  coarse labels). At sampling, `restrict=True` (the default) keeps each token's logits to the
  members of its coarse label: a fine id outside the cluster stage 1 chose would overrule
  stage 1, which is the premise of the method, and the mask costs one `masked_fill`. The
  paper's stage-2 top-k ablation (all > 32 > 1) is about top-k, which applies after the mask.
- [I] Stage 2 uses no CFG (the paper does not say; the coarse labels already carry the class).
- A stage-1 model samples on its own by decoding each coarse label as its cluster's
  representative fine id (the member nearest the centroid), so its runs log sample grids too.

Every model carries its lookup as buffers (saved with its weights) and the lookup's
fingerprint in its config; loading weights whose lookup does not match the fingerprint fails,
and a pair refuses two stages built on different lookups.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from raygen.models.ar import AR_SIZES, ARConfig, ARModel
from raygen.models.base import FamilySpec, GenerativeModel, token_loss
from raygen.models.kmeans import kmeans
from raygen.models.layers import LlamaGenMixin
from raygen.models.sampling import SamplingOptions, sampling_entry

# --- the lookup ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lookup:
    """fine id -> coarse id (V,), and each coarse id's representative fine id (K,)."""

    fine_to_coarse: torch.Tensor  # (V,) int64 in [0, K)
    representative: torch.Tensor  # (K,) int64 in [0, V); fine_to_coarse[representative[c]] == c

    @property
    def clusters(self) -> int:
        return int(self.representative.numel())

    @property
    def vocab_size(self) -> int:
        return int(self.fine_to_coarse.numel())

    def fingerprint(self) -> str:
        return lookup_fingerprint(self.fine_to_coarse, self.representative)


def lookup_fingerprint(fine_to_coarse: torch.Tensor, representative: torch.Tensor) -> str:
    """sha256 over K, V and both tables (16 hex digits)."""
    f2c = fine_to_coarse.detach().to("cpu", torch.int64).contiguous()
    rep = representative.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(f"ctf-lookup-v1 K={rep.numel()} V={f2c.numel()}".encode())
    h.update(f2c.numpy().tobytes())
    h.update(rep.numpy().tobytes())
    return h.hexdigest()[:16]


def check_lookup(fine_to_coarse: torch.Tensor, representative: torch.Tensor) -> None:
    """Every fine id maps to one coarse id in [0, K); every coarse id has members and its representative is one."""
    k, v = representative.numel(), fine_to_coarse.numel()
    if fine_to_coarse.ndim != 1 or representative.ndim != 1 or k < 1 or v < k:
        raise ValueError(f"a lookup needs fine_to_coarse (V,) and representative (K,) with 1 <= K <= V, got {v}, {k}")
    if int(fine_to_coarse.min()) < 0 or int(fine_to_coarse.max()) >= k:
        raise ValueError(f"coarse ids must lie in [0, {k})")
    if int(representative.min()) < 0 or int(representative.max()) >= v:
        raise ValueError(f"representatives must be fine ids in [0, {v})")
    empty = (torch.bincount(fine_to_coarse.long(), minlength=k) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"coarse ids {empty[:8]} have no fine ids")
    if not torch.equal(fine_to_coarse.long()[representative.long()], torch.arange(k)):
        raise ValueError("each coarse id's representative must be one of its own fine ids")


def cluster_codebook(codebook: torch.Tensor, clusters: int, *, seed: int = 0, iters: int = 100) -> Lookup:
    """k-means (k-means++ init, seeded) over codebook vectors (V, E) -> Lookup with K=clusters.

    Deterministic for (codebook, clusters, seed, iters). Coarse ids are renumbered in the order
    of each cluster's smallest fine id. Fails when the codebook has fewer distinct vectors than
    `clusters` (some coarse ids would have no fine ids).
    """
    v = codebook.shape[0]
    if not 1 <= clusters <= v:
        raise ValueError(f"clusters must lie in [1, {v}] (the codebook size), got {clusters}")
    distinct = torch.unique(codebook.float(), dim=0).shape[0]
    if distinct < clusters:
        raise ValueError(f"the codebook has {distinct} distinct vectors, fewer than clusters={clusters}")
    g = torch.Generator().manual_seed(seed)
    centres, assign = kmeans(codebook.float(), clusters, generator=g, iters=iters)  # (K, E), (V,)
    counts = torch.bincount(assign, minlength=clusters)
    if bool((counts == 0).any()):  # duplicates of one vector can leave a centre with no members
        raise ValueError(f"k-means left {int((counts == 0).sum())} of {clusters} clusters empty; use fewer clusters")
    # Renumber: cluster order = order of each cluster's smallest member.
    first = torch.full((clusters,), v, dtype=torch.long).scatter_reduce_(0, assign, torch.arange(v), "amin")
    new_id = torch.empty(clusters, dtype=torch.long)
    new_id[torch.argsort(first)] = torch.arange(clusters)
    fine_to_coarse = new_id[assign]  # (V,)
    centres = centres[torch.argsort(new_id)]  # row c = centre of new coarse id c
    # Representative: the member nearest its centre; ties go to the smaller fine id.
    dist = (codebook.float() - centres[fine_to_coarse]).pow(2).sum(dim=1)  # (V,)
    best = torch.full((clusters,), float("inf")).scatter_reduce(0, fine_to_coarse, dist, "amin")  # (K,)
    candidate = torch.where(dist == best[fine_to_coarse], torch.arange(v), v)  # (V,)
    representative = torch.full((clusters,), v, dtype=torch.long).scatter_reduce(0, fine_to_coarse, candidate, "amin")
    lookup = Lookup(fine_to_coarse, representative)
    check_lookup(lookup.fine_to_coarse, lookup.representative)
    return lookup


# --- config and sizes -------------------------------------------------------------------------


@dataclasses.dataclass
class CTFConfig(ARConfig):
    """A CTF stage. vocab_size is the fine vocabulary V (the data's); clusters is K."""

    stage: int = 1  # 1: raster AR over coarse labels; 2: bidirectional fine-id predictor
    clusters: int = 512  # K coarse labels (the paper's default)
    lookup_fingerprint: str = ""  # the lookup this model was built for (set by the platform)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in (1, 2):
            raise ValueError(f"CTFConfig: stage must be 1 or 2, got {self.stage}")
        if not 1 <= self.clusters <= self.vocab_size:
            raise ValueError(f"CTFConfig: clusters must lie in [1, vocab_size={self.vocab_size}], got {self.clusters}")


def _stage(size: str, stage: int) -> CTFConfig:
    a = AR_SIZES[size]
    return CTFConfig(dim=a.dim, n_layer=a.n_layer, n_head=a.n_head, stage=stage)


CTF_SIZES: dict[str, CTFConfig] = {
    "debug": _stage("debug", 1),
    "B": _stage("B", 1),  # 87M at K=512
    "L": _stage("L", 1),  # 310M
    "XL": _stage("XL", 1),  # 734M
    "aux-debug": _stage("debug", 2),
    "aux-B": _stage("B", 2),  # 111M (the paper's aux ablation)
    "aux-L": _stage("L", 2),  # 343M (the paper's default aux)
    "aux-XL": _stage("XL", 2),  # 775M
}


class _LookupBuffers:
    """Mixin: the lookup as persistent buffers, checked against config.lookup_fingerprint on load."""

    config: CTFConfig

    def _init_lookup(self) -> None:
        c = self.config
        # Placeholders until bind_lookup or load_state_dict fills them.
        self.register_buffer("fine_to_coarse", torch.zeros(c.vocab_size, dtype=torch.long))
        self.register_buffer("representative", torch.zeros(c.clusters, dtype=torch.long))
        self._lookup_bound = False
        self.register_load_state_dict_post_hook(lambda module, _: module._verify_lookup())

    def bind_lookup(self, lookup: Lookup) -> None:
        """Install the lookup (its fingerprint must be the config's)."""
        with torch.no_grad():
            if self.fine_to_coarse.is_meta:
                return
            self.fine_to_coarse.copy_(lookup.fine_to_coarse)
            self.representative.copy_(lookup.representative)
        self._verify_lookup()

    def lookup(self) -> Lookup:
        self._require_lookup()
        return Lookup(self.fine_to_coarse, self.representative)

    def _verify_lookup(self) -> None:
        c = self.config
        if self.fine_to_coarse.is_meta:
            return
        got = lookup_fingerprint(self.fine_to_coarse, self.representative)
        if got != c.lookup_fingerprint:
            raise ValueError(
                f"this CTF stage was built for lookup {c.lookup_fingerprint or '(none)'}, got lookup {got}"
            )
        check_lookup(self.fine_to_coarse.cpu(), self.representative.cpu())
        self._lookup_bound = True

    def _require_lookup(self) -> None:
        if not self._lookup_bound:
            raise ValueError("this CTF stage has no lookup yet: bind_lookup() or load its weights first")


# --- stage 1 -----------------------------------------------------------------------------------


class CTFStage1(_LookupBuffers, ARModel):
    """LlamaGen raster AR over K coarse labels; reads fine ids and maps them through the lookup."""

    def __init__(self, config: CTFConfig):
        if config.stage != 1:
            raise ValueError("CTFStage1 needs a stage-1 config")
        # The AR body is sized for K labels; self.config keeps V (the data's vocabulary).
        super().__init__(dataclasses.replace(config, vocab_size=config.clusters))
        self.config = config
        self._init_lookup()

    def forward(self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None):
        """Next-coarse-label loss (and accuracy) on the fine ids in batch["tokens"]."""
        self._require_lookup()
        coarse = self.fine_to_coarse[self.check_tokens(batch["tokens"])]  # (B, N) in [0, K)
        return super().forward({"tokens": coarse, "label": batch["label"]}, generator=generator)

    def generate_coarse(self, labels: torch.Tensor, **kw) -> torch.Tensor:
        """labels (B,) -> coarse labels (B, G, G): the AR sampler (N cached passes), ARModel's knobs."""
        self._require_lookup()
        return ARModel.generate(self, labels, **kw)

    @sampling_entry
    def generate(self, labels: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
        """Stage 1 alone: coarse labels decoded as their representatives -> (B, G, G) fine ids."""
        return self.representative[self.generate_coarse(labels, **opts.kwargs())]


# --- stage 2 -----------------------------------------------------------------------------------


class MemberPooledEmbedding(nn.Embedding):
    """V fine-id rows; a coarse label's embedding is the mean of its members' rows.

    The pooling runs inside this module's forward, so ZeRO-3 gathers the table for it.
    """

    def forward(self, coarse: torch.Tensor, fine_to_coarse: torch.Tensor, clusters: int) -> torch.Tensor:
        """coarse (B, N) in [0, K), fine_to_coarse (V,) -> (B, N, D)."""
        w = self.weight  # (V, D)
        sums = w.new_zeros(clusters, w.shape[1]).index_add(0, fine_to_coarse, w)  # (K, D)
        counts = torch.bincount(fine_to_coarse, minlength=clusters).to(w.dtype)  # (K,)
        return F.embedding(coarse, sums / counts[:, None])  # (B, N, D)


class CTFStage2(_LookupBuffers, LlamaGenMixin, GenerativeModel):
    """Bidirectional LlamaGen blocks over [class, N coarse labels] -> N fine-id distributions."""

    standalone = False  # it needs coarse labels: it samples inside a CTFPair

    def __init__(self, config: CTFConfig):
        super().__init__()
        if config.stage != 2:
            raise ValueError("CTFStage2 needs a stage-2 config")
        self.config = c = config
        self.build_trunk(c.n_layer, tok_embeddings=MemberPooledEmbedding(c.vocab_size, c.dim))
        self.register_tables()  # freqs_cis: not in checkpoints, rebuilt after any move or cast
        self._init_lookup()
        self.initialize_weights()

    def fine_logits(self, coarse: torch.Tensor, labels: torch.Tensor, *, train: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """coarse (B, N) in [0, K), labels (B,) -> float32 logits (B, N, V), one bidirectional pass."""
        self._require_lookup()
        cond = self.cls_embedding(labels, train=train, generator=generator)  # (B, 1, D)
        tok = self.tok_embeddings(coarse, self.fine_to_coarse, self.config.clusters)  # (B, N, D)
        h = torch.cat([cond, tok], dim=1)  # (B, 1 + N, D)
        h = self.tok_dropout(h)
        for layer in self.layers:
            h = layer(h, self.freqs_cis, causal=False)  # (B, 1 + N, D)
        return self.output(self.norm(h[:, 1:])).float()  # (B, N, V)

    def forward(self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None):
        """Teacher-forced on the true coarse labels: cross-entropy over all V fine ids."""
        tokens, labels = self.check_batch(batch)  # (B, N) fine ids, (B,)
        self._require_lookup()
        coarse = self.fine_to_coarse[tokens]  # (B, N)
        logits = self.fine_logits(coarse, labels, train=self.training, generator=generator)  # (B, N, V)
        with torch.no_grad():
            in_cluster = (self.fine_to_coarse[logits.argmax(dim=-1)] == coarse).float().mean()
        return {**token_loss(logits, tokens), "in_cluster": in_cluster}

    @sampling_entry
    def generate(
        self, labels: torch.Tensor, opts: SamplingOptions, *, coarse: torch.Tensor | None = None, restrict: bool = True
    ) -> torch.Tensor:
        """labels (B,), coarse (B, G, G) -> fine ids (B, G, G) in one forward pass.

        restrict keeps each token inside its coarse label's cluster (then top-k/top-p apply).
        cfg_scale must be 1 (stage 2 uses no CFG) and steps None or 1.
        """
        if coarse is None:
            raise ValueError("CTF stage 2 refines coarse labels: pass coarse=, or sample a CTF pair "
                             "(`raygen models register STAGE1_RUN --stage2 STAGE2_RUN --name NAME`)")
        if opts.guided or opts.steps not in (None, 1):
            raise ValueError(
                f"CTF stage 2 runs one pass without CFG: need cfg_scale=1 and steps 1, got {opts.cfg_scale}, {opts.steps}"
            )
        self.check_generator(opts.generator)
        c = self.config
        with self.evaluating():
            labels = self.check_labels(labels)
            coarse = self.check_tokens(coarse.to(labels.device))  # (B, N)
            if int(coarse.min()) < 0 or int(coarse.max()) >= c.clusters:
                raise ValueError(f"coarse labels must lie in [0, {c.clusters})")
            logits = self.fine_logits(coarse, labels)  # (B, N, V)
            if restrict:  # fine ids outside the token's cluster get -inf
                logits = logits.masked_fill(self.fine_to_coarse != coarse[..., None], float("-inf"))
            return rearrange(opts.sample(logits), "b (r c) -> b r c", r=c.grid_size)  # (B, N) fine ids


# --- the pair ----------------------------------------------------------------------------------


class CTFPair(GenerativeModel):
    """A trained stage 1 and stage 2 on one lookup: the CTF generator."""

    def __init__(self, stage1: CTFStage1, stage2: CTFStage2):
        super().__init__()
        a, b = stage1.config, stage2.config
        for field in ("vocab_size", "num_classes", "grid_size", "clusters", "lookup_fingerprint"):
            if getattr(a, field) != getattr(b, field):
                raise ValueError(f"the CTF stages disagree on {field}: stage 1 has {getattr(a, field)!r}, "
                                 f"stage 2 {getattr(b, field)!r}")
        self.stage1, self.stage2 = stage1, stage2
        self.config = a

    def forward(self, batch: dict[str, torch.Tensor], *, generator: torch.Generator | None = None):
        """Both stages' teacher-forced losses on one batch; loss = their sum."""
        one, two = self.stage1(batch, generator=generator), self.stage2(batch, generator=generator)
        return {"loss": one["loss"] + two["loss"], "loss_stage1": one["loss"].detach(),
                "loss_stage2": two["loss"].detach(), "acc_stage2": two["acc"]}

    def flops_per_sample(self) -> float:
        return self.stage1.flops_per_sample() + self.stage2.flops_per_sample()

    @sampling_entry
    def generate(self, labels: torch.Tensor, opts: SamplingOptions, *, fine_temperature: float = 1.0,
                 fine_top_k: int = 0, fine_top_p: float = 1.0, restrict: bool = True) -> torch.Tensor:
        """labels (B,) -> fine ids (B, G, G): stage 1 (CFG, temperature = tau1, top-k/p) then stage 2 (tau2).

        opts drive stage 1; stage 2 samples with the fine_* knobs and the same generator.
        """
        coarse = self.stage1.generate_coarse(labels, **opts.kwargs())  # (B, G, G)
        return self.stage2.generate(labels, coarse=coarse, temperature=fine_temperature, top_k=fine_top_k,
                                    top_p=fine_top_p, generator=opts.generator, restrict=restrict)


def build_ctf(config: CTFConfig) -> GenerativeModel:
    """The stage the config names."""
    return CTFStage1(config) if config.stage == 1 else CTFStage2(config)


CTF_FAMILY = FamilySpec(family="ctf", model_cls=build_ctf, config_cls=CTFConfig, sizes=CTF_SIZES)
