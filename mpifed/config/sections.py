"""The configuration's sections, each a frozen dataclass: the one place where a key's type,
default, accepted values or range and description are written.

    [data] [model] [optim] [comm] [run]   every run
    [federated] [federated.dp]            a federation, and its differential privacy

A component receives its own section (the optimizer an `OptimConfig`, the step a `CommConfig`),
never the whole `Config`. Sections check themselves when built, so a `Config` made in Python
is held to the same rules as one read from TOML.
"""


from dataclasses import dataclass, replace
from typing import ClassVar

from ..choices import (
    ALGORITHMS,
    COMPRESSIONS,
    CONV_BACKENDS,
    PROGRESS_MODES,
    RESUME_MODES,
    STAGES,
)
from ..errors import UserError
from ..federated.dp import ACCOUNTANTS
from ..federated.personal import PERSONALIZATIONS, SPLITS
from ..federated.robust import PRIVATE_REFUSAL
from ..federated.rotated import UPDATE_COMPRESSIONS
from ..federated.secagg import OUT_OF_RANGE_MODES, SINT
from ..federated.strategies import DEFAULT_SERVER_LR, STRATEGIES
from ..nn.layers.functional import GELU_FORMS
from ..nn.models import DTYPES
from ..nn.precision import HALF, PRECISIONS
from ..nn.spec import CONFIG_KINDS, check_model_config
from ..optim.optimizers import ADAM_DEFAULTS, OPTIMIZERS, SGD_DEFAULTS
from ..optim.schedules import SCHEDULES
from ..xp import BACKENDS
from .fields import Section, did_you_mean, setting

_SERVER_LR = ", ".join(f"{k} {v}" for k, v in DEFAULT_SERVER_LR.items())


@dataclass(frozen=True)
class DataConfig(Section):
    SECTION: ClassVar[str] = "data"
    train: str = setting(None, "training set: an HDF5 file with x and y, or a template with "
                         "{institution} for one file per institution", required=True)
    test: str = setting("", "test set (HDF5), evaluated every run.eval_every steps and at the "
                        "end (a federation: after every round); empty: none")
    x: str = setting("x", "name of the features dataset in the HDF5 files")
    y: str = setting("y", "name of the integer labels dataset in the HDF5 files")
    shuffle: bool = setting(True, "reshuffle the rank's rows every epoch, from (run.seed, "
                            "epoch, rank)")
    shuffle_block: int = setting(0, "streamed shards: rows per block of the block permutation; "
                                 "0: the file's rows per chunk, or 4096", low=0)
    shuffle_buffer: int = setting(0, "streamed shards: blocks per in-buffer shuffle; 0: the blocks "
                                  "that fit in min(MPIFED_SHARD_MEMORY_BYTES / 8, 256 MiB), at "
                                  "least 4",
                                  low=0)


@dataclass(frozen=True)
class ModelConfig(Section):
    SECTION: ClassVar[str] = "model"
    kind: str = setting("softmax", "the model: a preset, or sequential (model.layers); object "
                        "records a model object with layers of its own given to "
                        "mpifed.train.run", choices=CONFIG_KINDS)
    hidden: tuple[int, ...] = setting((), "mlp: hidden layer widths, e.g. [128, 64]", low=1)
    layers: tuple[dict, ...] = setting((), "sequential: the layers as tables, e.g. "
                                       "[{type = \"conv2d\", out = 16, kernel = 3}]")
    depth: int = setting(20, "resnet: depth 8, 14 or 20")
    factory: str = setting("", "\"package.module:function\" returning layers for "
                           "(input_shape, num_classes); empty: none")
    init: str = setting("", "a model file (HDF5) to start from instead of a fresh model; "
                        "empty: none")
    dtype: str = setting("float32", "dtype of parameters and features; with a half "
                         "model.precision, the fp32 master weights", choices=DTYPES)
    precision: str = setting("fp32", "compute precision of forward and backward: fp16 or bf16 "
                             "compute on fp32 master weights (mixed precision; on CPU for "
                             "correctness only, no BLAS)", choices=PRECISIONS)
    conv_backend: str = setting("native", "convolutions: the package's own kernels, or cudnn "
                                "(GPU, nvidia-cudnn-frontend; not built yet)",
                                choices=CONV_BACKENDS)
    dtype: str = setting("float32", "dtype of parameters and features", choices=DTYPES)
    n_layer: int = setting(4, "gpt: transformer blocks", low=1)
    n_head: int = setting(4, "gpt: attention heads per block (n_embd must be a multiple)", low=1)
    n_embd: int = setting(128, "gpt: width of the token embedding and of every block", low=1)
    block_size: int = setting(64, "gpt: context length in tokens; a sample is a window of "
                              "block_size + 1 tokens", low=1)
    vocab_size: int = setting(0, "gpt: vocabulary size; 0: the token file's vocab_size", low=0)
    dropout: float = setting(0.0, "gpt: dropout probability (embedding, attention, residuals)",
                             low=0, high=1, high_in=False)
    gelu: str = setting("tanh", "gpt: the MLP's GELU, tanh (GPT-2's approximation) or exact "
                        "(nanoGPT's x Phi(x))", choices=GELU_FORMS)
    recompute: bool = setting(False, "gpt: keep only each block's input in the forward pass and "
                              "recompute its activations during the backward pass")

    def check(self) -> None:
        check_model_config(self)
        if self.precision in HALF and self.dtype != "float32":
            raise UserError(f"model.precision = \"{self.precision}\" with model.dtype = "
                            f"\"{self.dtype}\": mixed precision keeps float32 master weights; "
                            "set model.dtype = \"float32\" or model.precision = \"fp32\"")


@dataclass(frozen=True)
class OptimConfig(Section):
    SECTION: ClassVar[str] = "optim"
    name: str = setting("sgd", "the optimizer", choices=OPTIMIZERS)
    lr: float = setting(0.1, "learning rate (peak, under a schedule)", low=0, low_in=False)
    momentum: float = setting(SGD_DEFAULTS["momentum"], "SGD momentum", low=0, high=1, high_in=False)
    nesterov: bool = setting(SGD_DEFAULTS["nesterov"], "Nesterov momentum (needs optim.momentum > 0)")
    weight_decay: float = setting(SGD_DEFAULTS["weight_decay"], "weight decay: sgd and adam "
                                  "add wd * w to the gradient (L2); adamw decays the weights "
                                  "apart from the gradient, and only arrays of 2 or more "
                                  "dimensions (not biases, not LayerNorm)", low=0)
    batch_size: int = setting(32, "rows per rank per step", low=1)
    epochs: int | None = setting(None, "passes over the data (a federation reads "
                                 "federated.rounds instead); unset: 1 unless optim.steps is "
                                 "set", low=1)
    steps: int | None = setting(None, "steps to train instead of optim.epochs (not read by a "
                                "federation); unset: use epochs", low=1)
    schedule: str = setting("constant", "learning-rate schedule", choices=SCHEDULES)
    warmup: int = setting(0, "steps (rounds in a federation) of linear warm-up before the "
                          "schedule", low=0)
    step_size: int = setting(1000, "schedule = \"step\": steps (rounds in a federation) "
                             "between decays", low=1)
    gamma: float = setting(0.1, "schedule = \"step\": decay factor", low=0, low_in=False)
    beta1: float = setting(ADAM_DEFAULTS["beta1"], "Adam: first-moment decay", low=0, high=1,
                           high_in=False)
    beta2: float = setting(ADAM_DEFAULTS["beta2"], "Adam: second-moment decay", low=0, high=1,
                           high_in=False)
    eps: float = setting(ADAM_DEFAULTS["eps"], "Adam: denominator epsilon", low=0, low_in=False)
    loss_scale: float | str | None = setting(None, "model.precision fp16/bf16: \"dynamic\" "
                                             "loss scaling, or a fixed scale; unset: dynamic "
                                             "for fp16, 1 (none) for bf16 and fp32",
                                             words=("dynamic",), low=0, low_in=False)
    loss_scale_init: float = setting(65536.0, "dynamic loss scaling: the starting scale",
                                     low=0, low_in=False)
    loss_scale_growth_interval: int = setting(2000, "dynamic loss scaling: clean steps in a "
                                              "row before the scale doubles (an overflow "
                                              "halves it and skips the step)", low=1)
    grad_clip: float = setting(0.0, "clip the global gradient norm (over all ranks' shards) to "
                               "this; 0: off", low=0)
    accumulate: int = setting(1, "micro-batches of optim.batch_size rows per step, their "
                              "gradients averaged (a step reads batch_size x accumulate rows "
                              "per rank)", low=1)

    def __post_init__(self):
        if self.epochs is None and self.steps is None:
            object.__setattr__(self, "epochs", 1)
        super().__post_init__()

    def check(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise UserError("optim.epochs and optim.steps are both set; set only one of them")
        if self.nesterov and not self.momentum:
            raise UserError("optim.nesterov: needs optim.momentum > 0")
        if isinstance(self.loss_scale, str) and self.loss_scale != "dynamic":
            raise UserError(f"optim.loss_scale: expected \"dynamic\" or a number > 0, got "
                            f"{self.loss_scale!r}")


@dataclass(frozen=True)
class CommConfig(Section):
    SECTION: ClassVar[str] = "comm"
    allreduce: str = setting("auto", "gradient all-reduce algorithm; auto measures each at "
                             "the run's sizes once per topology, cached in $XDG_CACHE_HOME/mpifed "
                             "(MPIFED_AUTOTUNE=0: a fixed rule)",
                             choices=ALGORITHMS)
    backend: str = setting("auto", "array module: cupy where a GPU is, else numpy",
                           choices=BACKENDS)
    overlap: bool = setting(False, "all-reduce each layer's gradients during the backward pass")
    stall_timeout: float = setting(600.0, "seconds a collective may wait for a late rank before "
                                   "the job ends naming it; 0: never", low=0)
    shard: str = setting("none", "ZeRO stage: shard optimizer state, gradients or parameters "
                         "across ranks", choices=STAGES)
    compression: str = setting("none", "gradient compression: none (exact), fp16 or bf16 (a "
                               "half-precision wire, fp32 sums on each hop) or powersgd "
                               "(low rank, error feedback)", choices=COMPRESSIONS)
    predivide: bool = setting(True, "fp16/bf16: divide by the rank count before the sum (else "
                              "after it)")
    powersgd_rank: int = setting(2, "powersgd: rank of each matrix's factors", low=1)
    compression_start: int = setting(10, "powersgd: steps exchanged uncompressed before the "
                                     "compression starts", low=0)
    powersgd_min_rate: float = setting(2.0, "powersgd: compress an n x m matrix only where "
                                       "(n + m) * rank * min_rate <= n * m; 0: every matrix",
                                       low=0)

    def check(self) -> None:
        scheme = self.compression
        if scheme == "none":
            return
        if self.allreduce == "nccl":
            raise UserError(f"comm.compression = \"{scheme}\" with comm.allreduce = \"nccl\": "
                            "compressed exchanges run on the package's own collectives over "
                            "MPI (fp32 sums on each hop of the half-precision ring, PowerSGD's "
                            "P and Q on the ring), which NCCL does not run; set comm.allreduce "
                            "= \"auto\" or \"ring\", or comm.compression = \"none\"")
        if scheme in ("fp16", "bf16") and self.allreduce in ("mpi", "hierarchical"):
            raise UserError(f"comm.compression = \"{scheme}\" with comm.allreduce = "
                            f"\"{self.allreduce}\": a half-precision wire needs each hop to add "
                            "in fp32, which only the package's own ring does (MPI's and the "
                            "node's sums would add half-precision values); set comm.allreduce "
                            "= \"auto\" or \"ring\"")
        if scheme == "powersgd" and self.shard in ("gradients", "parameters"):
            raise UserError(f"comm.compression = \"powersgd\" with comm.shard = "
                            f"\"{self.shard}\": the sharded stages reduce-scatter gradients, "
                            "each rank keeping only its chunk of the sum, and a low-rank "
                            "factorisation needs whole matrices on every rank (P = M Q is not "
                            "a sum of chunks); set comm.shard = \"none\" (or \"optimizer\" once "
                            "supported) or comm.compression = \"none\"")
        if self.shard != "none":
            raise UserError(f"comm.compression = \"{scheme}\" with comm.shard = "
                            f"\"{self.shard}\": the ZeRO stages exchange gradients with their own "
                            "reduce-scatter, which compression is not wired into; set "
                            "comm.shard = \"none\" or comm.compression = \"none\"")


@dataclass(frozen=True)
class RunConfig(Section):
    SECTION: ClassVar[str] = "run"
    seed: int = setting(0, "seed of the model, the shuffles and the sampling", low=0)
    out: str = setting("runs/latest", "output folder: model.h5, metrics.jsonl, checkpoints")
    log_every: int = setting(10, "steps between metrics records; 0: no step records (the "
                             "summary is still written); a federation records every round",
                             low=0)
    eval_every: int = setting(0, "steps between test-set evaluations; 0: at the end only "
                              "(needs data.test); a federation evaluates after every round",
                              low=0)
    progress: str = setting("auto", "progress display: auto is a bar on a terminal, else "
                            "lines; none: nothing", choices=PROGRESS_MODES)
    checkpoint_every: int = setting(0, "steps (rounds in a federation) between checkpoints; "
                                    "0: none (a stop signal still writes one)", low=0)
    resume: str = setting("auto", "\"auto\" resumes from run.out's newest checkpoint, \"never\" "
                          "sets old checkpoints aside, or the path of a checkpoint",
                          words=RESUME_MODES, other="a checkpoint path")
    keep_checkpoints: int = setting(3, "checkpoints kept in run.out/checkpoints", low=1)
    timeline: bool = setting(False, "write run.out/timeline.json, a Chrome trace of every "
                             "rank's compute, all-reduces and data waits, clocks aligned across "
                             "hosts; a federation writes one per institution, of its own ranks, "
                             "in run.out/institution-K/timeline.json")
    cuda_graph: bool = setting(False, "GPU: capture the training step as a CUDA graph (not "
                               "built yet: refused)")

    def check(self) -> None:
        if not self.out:
            raise UserError("run.out: empty; set the output folder, e.g. run.out = "
                            "\"runs/latest\"")
        if not self.resume:
            raise UserError("run.resume: expected " + ", ".join(f'"{m}"' for m in RESUME_MODES)
                            + " or the path of a checkpoint file")
        near = did_you_mean(self.resume, RESUME_MODES)
        if self.resume not in RESUME_MODES and near and not set("/.\\") & set(self.resume):
            raise UserError(f"run.resume: {self.resume!r} is neither a word nor a checkpoint path"
                            f"{near}; expected " + ", ".join(f'"{m}"' for m in RESUME_MODES)
                            + " or the path of a checkpoint file")


@dataclass(frozen=True)
class DPConfig(Section):
    SECTION: ClassVar[str] = "federated.dp"
    OTHERWISE: ClassVar[str] = " (an empty table for the defaults), or remove it for no DP"
    clip: float = setting(1.0, "L2 bound of each institution's update (the starting bound when "
                          "adaptive)", low=0, low_in=False)
    noise_multiplier: float = setting(1.0, "z: Gaussian noise stddev over the clip", low=0)
    delta: float = setting(1e-5, "delta of the reported (epsilon, delta)", low=0, high=1,
                           low_in=False, high_in=False)
    adaptive: bool = setting(False, "adapt the clip to a quantile of update norms (Andrew et al.)")
    target_quantile: float = setting(0.5, "adaptive: the quantile of norms to clip at", low=0,
                                     high=1, low_in=False, high_in=False)
    clip_lr: float = setting(0.2, "adaptive: the clip's geometric learning rate", low=0)
    clip_count_stddev: float | None = setting(None, "adaptive: noise on the clipped count; "
                                              "unset: max(q*K/20, z) with q = "
                                              "federated.fraction, K institutions, z = "
                                              "noise_multiplier (0 when z = 0)", low=0)
    max_epsilon: float = setting(0.0, "stop before a round would pass this epsilon; 0: no limit",
                                 low=0)
    colluders: int = setting(0, "institutions that may collude with the root: noise shares are "
                             "sized for the root plus these", low=0)
    accountant: str = setting("rdp", "privacy accountant", choices=ACCOUNTANTS)

    def check(self) -> None:
        if self.noise_multiplier == 0 and self.max_epsilon:
            raise UserError("federated.dp.max_epsilon: with noise_multiplier = 0 every round "
                            "costs infinite epsilon, so no round could run; set "
                            "noise_multiplier > 0 or remove max_epsilon")


@dataclass(frozen=True)
class FederatedConfig(Section):
    SECTION: ClassVar[str] = "federated"
    institutions: int | None = setting(None, "K institutions of equal size; unset: set "
                                       "institution_sizes instead", low=1)
    institution_sizes: tuple[int, ...] | None = setting(None, "ranks of each institution, e.g. "
                                                        "[2, 1, 3]; unset: set institutions",
                                                        low=1)
    rounds: int = setting(10, "federated rounds", low=1)
    local_steps: int | str | None = setting(None, "local steps per round, or \"proportional\" "
                                            "(one local epoch: steps in proportion to each "
                                            "institution's data); unset: 1 unless "
                                            "local_epochs is set", words=("proportional",), low=1)
    local_epochs: int | None = setting(None, "local epochs per round; unset: use "
                                       "local_steps", low=1)
    strategy: str = setting("fedavg", "server strategy", choices=tuple(STRATEGIES))
    mu: float = setting(0.01, "fedprox: proximal term weight", low=0)
    server_lr: float | None = setting(None, f"server learning rate; unset: {_SERVER_LR}, else 1",
                                      low=0, low_in=False)
    beta1: float = setting(0.9, "fedavgm/fedadam/fedyogi/fedadagrad: server momentum", low=0,
                           high=1, high_in=False)
    beta2: float = setting(0.99, "fedadam/fedyogi: second-moment decay", low=0, high=1,
                           high_in=False)
    tau: float = setting(1e-3, "fedadam/fedyogi/fedadagrad: adaptivity (denominator) epsilon",
                         low=0, low_in=False)
    trim_fraction: float = setting(0.2, "fedtrimmedavg: share of the institutions' values cut "
                                   "from each side of every coordinate (Flower's beta)", low=0,
                                   high=0.5, high_in=False)
    num_malicious: int = setting(0, "krum/multikrum/bulyan: malicious institutions to withstand, "
                                 "f (Flower's num_malicious_clients); krum needs more than "
                                 "2f + 2 institutions per round, bulyan at least 4f + 3", low=0)
    num_selected: int = setting(0, "multikrum: models averaged (Flower's num_clients_to_keep; "
                                "0: Krum's one model, as Flower), at most K - num_malicious",
                                low=0)
    q: float = setting(0.2, "qfedavg: fairness exponent of q-FFL (Flower's q_param); 0 is the "
                       "unweighted mean", low=0)
    fraction: float = setting(1.0, "institutions sampled each round: max(1, round(fraction*K)) "
                              "of them; under DP each with probability fraction", low=0,
                              high=1, low_in=False)
    evaluate_local: bool = setting(False, "report each institution's model on its own rows")
    personalization: str = setting("none", "what stays with each institution: fedbn (batch-norm "
                                   "layers), fedper (federated.personal_layers) or ditto (a "
                                   "personal model beside the global one)",
                                   choices=PERSONALIZATIONS)
    personal_layers: tuple[int, ...] = setting((), "fedper: indices into the model's layers that "
                                               "stay local, e.g. [3]: the head of an mlp with one "
                                               "hidden layer (flatten, linear, relu, linear)",
                                               low=0)
    ditto_lambda: float = setting(0.1, "ditto: weight lambda of the proximal term "
                                  "lambda/2 ||v - w||^2 pulling the personal model v to the "
                                  "global w", low=0)
    finetune_steps: int = setting(0, "local steps each institution takes on its own model after "
                                  "the last round (any personalization)", low=0)
    compression: str = setting("none", "institution updates on the wire: none (as trained) or "
                               "rotated (a shared-seed random rotation, then stochastic "
                               "quantisation to compression_bits a coordinate)",
                               choices=UPDATE_COMPRESSIONS)
    compression_bits: int = setting(8, "rotated: bits per coordinate of an institution's "
                                    "update", low=2, high=16)
    secure_aggregation: bool = setting(False, "pairwise-masked sums: the root sees only the total")
    secure_bits: int = setting(64, "width of the masked integers", choices=tuple(SINT))
    secure_range: float = setting(1.0, "largest |value| of an update coordinate to encode, "
                                  "before its sample weight (under DP at least the clip)",
                                  low=0, low_in=False)
    secure_max_samples: int = setting(2 ** 31, "largest sample weight to encode", low=1)
    secure_out_of_range: str = setting("error", "a value beyond secure_range: error or clip",
                                       choices=OUT_OF_RANGE_MODES)
    min_participants: int = setting(3, "fewest institutions sending per round under secure "
                                    "aggregation", low=1)
    keys: str = setting("", "folder of Ed25519 identity keys: this institution's site-K.key "
                        "(mpifed keys new) and roster.toml (mpifed keys roster); empty: "
                        "unauthenticated, refused with [federated.dp]")
    keys_roster_sha256: str = setting("", "SHA-256 (hex) of roster.toml in federated.keys, as "
                                      "mpifed keys roster prints it; every leader refuses "
                                      "another roster; empty: not pinned")
    dp: DPConfig | None = setting(None, "institution-level DP-FedAvg ([federated.dp]); unset: "
                                  "no DP")

    def __post_init__(self):
        if self.local_steps is None and self.local_epochs is None:
            object.__setattr__(self, "local_steps", 1)
        super().__post_init__()

    def check(self) -> None:
        if (self.institutions is None) == (self.institution_sizes is None):
            raise UserError("federated: set exactly one of federated.institutions (K equal "
                            "groups) and federated.institution_sizes (e.g. [2, 1, 3])")
        sizes = self.institution_sizes
        if sizes is not None and not sizes:
            raise UserError(f"federated.institution_sizes: expected a list of positive "
                            f"integers, got {list(sizes)!r}")
        self._check_local_work()
        self._check_personalization()
        if self.keys and not self.secure_aggregation:
            raise UserError("federated.keys: authenticated keys serve secure aggregation; set "
                            "federated.secure_aggregation = true or remove federated.keys")
        self._check_keys_pinned()
        if self.secure_aggregation and self.dp is not None and not self.keys:
            raise UserError(
                "federated.keys: secure aggregation with [federated.dp] needs identity keys. "
                "Without them the leaders cannot tell the root's relayed round keys from their "
                "peers', so an active root can sit in the middle of every pair, unmask each "
                "institution's update, and the ledger's epsilon (which assumes the root sees "
                "only the noised sum) would be false. Each institution K runs `mpifed keys new "
                "K DIR` on its own machine, `mpifed keys roster DIR --institutions N` collects "
                "the public keys; set federated.keys = \"DIR\" and federated.keys_roster_sha256 "
                "to the hash it prints (`mpifed keys generate DIR --institutions N` for tests)")
        if self.compression == "rotated" and self.secure_aggregation and self.dp is not None:
            raise UserError(
                "federated.compression = \"rotated\" with secure aggregation and [federated.dp]: "
                "refused. There each leader adds its share of the noise, and rounding every "
                "leader's noised vector on its own is not a post-processing of the noised sum, "
                "so the ledger's epsilon would not hold (that needs the distributed discrete "
                "Gaussian mechanism, not built). Use rotated compression with DP alone (the "
                "root adds the noise) or with secure aggregation alone, or set "
                "federated.compression = \"none\"")
        private = self.secure_aggregation or self.dp is not None
        if private and self.strategy == "fednova":
            raise UserError("federated.strategy: fednova needs every institution's own step "
                            "count, which secure aggregation and DP keep from the root; use "
                            "another strategy")
        if private and self.strategy in PRIVATE_REFUSAL:
            under = "secure aggregation" if self.secure_aggregation else "[federated.dp]"
            raise UserError(
                f"federated.strategy: {self.strategy} is refused under {under}: "
                f"{PRIVATE_REFUSAL[self.strategy]}, and the root sees only the sum of the "
                "updates. There, bound each institution's influence instead: DP clips every "
                "update to norm federated.dp.clip before the sum (fedavg with [federated.dp]), "
                "so no institution can move the model further than the clip")

    def _check_personalization(self) -> None:
        mode, layers = self.personalization, self.personal_layers
        if mode == "fedper" and not layers:
            raise UserError("federated.personal_layers: fedper keeps these layers local and none "
                            "is listed; set e.g. federated.personal_layers = [3] (the head of "
                            "an mlp with one hidden layer)")
        if layers and mode != "fedper":
            raise UserError(f"federated.personal_layers: only fedper reads it, personalization is "
                            f"{mode!r}; set federated.personalization = \"fedper\" or remove it")
        if len(set(layers)) != len(layers):
            raise UserError(f"federated.personal_layers: {list(layers)} lists a layer twice")
        if mode in SPLITS and (self.secure_aggregation or self.dp is not None):
            raise UserError(f"federated.personalization: {mode} with secure aggregation or "
                            "[federated.dp] is not supported yet: the masked and noised sums "
                            "cover the whole model, so they would carry the personal layers too; "
                            "use \"ditto\" there (it shares the whole global model)")
        if mode in SPLITS and self.compression != "none":
            raise UserError(f"federated.personalization: {mode} with federated.compression = "
                            f"{self.compression!r} is not supported yet: the compressed update "
                            "and its accounting cover the whole model; use \"ditto\" (it shares "
                            "the whole global model) or federated.compression = \"none\"")

    def _check_keys_pinned(self) -> None:
        pinned = self.keys_roster_sha256
        if not pinned:
            return
        if not self.keys:
            raise UserError("federated.keys_roster_sha256: pins the roster of federated.keys, "
                            "which is not set; set federated.keys = \"DIR\" or remove "
                            "federated.keys_roster_sha256")
        if len(pinned) != 64 or any(c not in "0123456789abcdefABCDEF" for c in pinned):
            raise UserError(f"federated.keys_roster_sha256: expected 64 hex digits (the SHA-256 "
                            f"that mpifed keys roster prints), got {pinned!r}")

    def _check_local_work(self) -> None:
        steps = self.local_steps
        if steps is not None and self.local_epochs is not None:
            raise UserError("federated.local_steps and federated.local_epochs are both set; "
                            "set only one of them")
        if isinstance(steps, str) and steps != "proportional":
            raise UserError(f"federated.local_steps: expected a positive integer or "
                            f"\"proportional\", got {steps!r}")

    @property
    def server_step(self) -> float:
        """The server learning rate in use: server_lr, else the strategy's default."""
        return self.server_lr or DEFAULT_SERVER_LR.get(self.strategy, 1.0)


@dataclass(frozen=True)
class Config(Section):
    """The whole run configuration; `federated` is None for a data-parallel run."""

    data: DataConfig
    model: ModelConfig = setting(ModelConfig(), "the model")
    optim: OptimConfig = setting(OptimConfig(), "the optimizer, batch and length of training")
    comm: CommConfig = setting(CommConfig(), "communication: all-reduce, backend, sharding")
    run: RunConfig = setting(RunConfig(), "seed, output, logging, checkpoints")
    federated: FederatedConfig | None = setting(None, "a federation of institutions; unset: "
                                                "one data-parallel run")

    def check(self) -> None:
        self._check_precision()
        if self.comm.compression == "powersgd" and self.federated is not None:
            raise UserError("comm.compression = \"powersgd\" in a federation: each "
                            "institution's error feedback and warm start would live on its "
                            "ranks, but a federation's checkpoint holds only the global model "
                            "and the server's state, so a resume could not continue to the same "
                            "bits; use \"fp16\" or \"bf16\" (no state), or remove [federated]")
        personal = self.federated is not None and (
            self.federated.personalization != "none" or self.federated.finetune_steps)
        if personal and self.comm.shard != "none":
            raise UserError(f"federated.personalization: personal models with comm.shard = "
                            f"\"{self.comm.shard}\" are not supported: a personal step swaps "
                            "the institution's model in and out of the step's buffer, which the "
                            "ZeRO stages split and pair with their own optimizer state; set "
                            "comm.shard = \"none\"")
        if "{institution}" in self.data.test and self.federated is None:
            raise UserError(f"data.test: {self.data.test!r} has an {{institution}} field, which "
                            "only a federation fills in; name one file or add [federated]")
        if self.run.eval_every and not self.data.test and self.federated is None:
            raise UserError(f"run.eval_every = {self.run.eval_every} needs a test set; set "
                            "data.test or remove run.eval_every")

    def _check_precision(self) -> None:
        precision, scale = self.model.precision, self.optim.loss_scale
        if precision not in HALF:
            if scale is not None and scale != 1:
                raise UserError(f"optim.loss_scale = {scale!r} with model.precision = "
                                f"\"{precision}\": loss scaling keeps half-precision gradients "
                                "from flushing to zero; set model.precision = \"fp16\" or "
                                "\"bf16\", or remove optim.loss_scale")
            return
        if self.federated is not None:
            raise UserError(f"model.precision = \"{precision}\" in a federation: the loss "
                            "scaler's state would live on each institution's ranks, outside "
                            "the federation's checkpoint; set model.precision = \"fp32\" or "
                            "remove [federated]")
        if self.comm.compression == "powersgd":
            raise UserError(f"model.precision = \"{precision}\" with comm.compression = "
                            "\"powersgd\": PowerSGD's error feedback would take in the inf of a "
                            "step that mixed precision skips; set comm.compression = \"none\", "
                            "\"fp16\" or \"bf16\", or model.precision = \"fp32\"")
        if self.optim.accumulate > 1:
            raise UserError(f"model.precision = \"{precision}\" with optim.accumulate = "
                            f"{self.optim.accumulate}: the half-precision step does not sum "
                            "micro-batches yet; set optim.accumulate = 1 (raise "
                            "optim.batch_size) or model.precision = \"fp32\"")
        if self.model.kind == "gpt":
            raise UserError(f"model.precision = \"{precision}\" with model.kind = \"gpt\": the "
                            "transformer layers are not checked in half precision yet; set "
                            "model.precision = \"fp32\"")

    @classmethod
    def from_table(cls, table) -> "Config":
        """Build the configuration from TOML's dict of sections (missing sections: defaults)."""
        known = cls.declared()
        for name in table:
            if name in known:
                continue
            homes = [s for s, kind in SECTIONS.items() if name in kind.declared()]
            if not isinstance(table[name], dict):
                fix = ("put it under " + " or ".join(f"[{h}]" for h in homes) if homes
                       else "no section has such a key (mpifed train --help lists them)")
                raise UserError(f"{name} = {table[name]!r}: a key outside any section; {fix}")
            raise UserError(f"[{name}]: unknown section{did_you_mean(name, known)}; known: "
                            f"{', '.join(known)}")
        sections = {}
        for name in known:
            kind = SECTIONS[name]
            if name in table:
                sections[name] = kind.from_table(table[name])
            elif name != "federated":
                sections[name] = kind.from_table({})
        return cls(**sections)

    def with_values(self, **sections) -> "Config":
        """Return a copy with whole sections replaced (each checked when it was built)."""
        return replace(self, **sections)


# section name -> its class, in the order users read them; federated.dp nests in federated.
SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "comm": CommConfig,
            "run": RunConfig, "federated": FederatedConfig}
ALL_SECTIONS = {**SECTIONS, "federated.dp": DPConfig}
