"""What each `mpifed` sub-command does once its arguments are parsed."""

from __future__ import annotations

from ..log import get_logger
from .output import emit, progress

log = get_logger(__name__)


def run_train(args) -> int:
    from mpi4py import MPI

    from ..config import load_config
    from ..train.loop import train

    cfg = load_config(args.config, args.set or ())
    train(cfg, MPI.COMM_WORLD)
    return 0


def run_config(args) -> int:
    """`mpifed config ACTION`: never imports MPI, so it runs anywhere the package installs."""
    from ..config import load_config
    from ..config.render import reference_markdown, schema_text, show_toml

    if args.config_command == "schema":
        emit(schema_text(), end="")
    elif args.config_command == "reference":
        emit(reference_markdown(), end="")
    else:
        cfg = load_config(args.config, args.set or ())
        if args.config_command == "show":
            emit(show_toml(cfg), end="")
        else:
            emit(f"{args.config}: valid")
    return 0


def run_evaluate(args) -> int:
    import numpy as np
    from mpi4py import MPI

    from ..comm.agree import raise_together
    from ..errors import UserError
    from ..nn.io import load_model
    from ..train.evaluate import evaluate
    from ..train.setup import open_checked_shard

    comm = MPI.COMM_WORLD
    spec, host = raise_together(comm, lambda: load_model(args.model, key="model"))
    if spec.kind == "gpt":  # a token file, cut into the model's windows
        from ..train.setup import open_token_shard

        shard, classes = open_token_shard(comm, args.data, spec.input_shape[0], host.dtype,
                                          "data")
    else:
        shard, classes = open_checked_shard(comm, args.data, args.x, args.y, host.dtype,
                                            "data", features=spec.features)
    if classes > spec.num_classes:
        raise UserError(f"data: {args.data!r} has labels up to {classes - 1}, the model knows "
                        f"{spec.num_classes} classes")
    result = evaluate(spec, host, shard, comm, np)
    if comm.rank == 0:
        emit(f"loss {result['loss']:.6f} accuracy {result['accuracy']:.4f} "
             f"samples {result['samples']}"
             + (f" perplexity {result['perplexity']:.4f}" if "perplexity" in result else ""))
    return 0


def run_generate(args) -> int:
    from ..errors import UserError
    from ..nn.generate import generate
    from ..nn.io import load_model

    spec, host = load_model(args.model, key="model")
    if spec.kind != "gpt":
        raise UserError(f"model: {args.model!r} holds a {spec.kind} model; mpifed generate "
                        "samples from a GPT (model.kind = \"gpt\")")
    if args.tokens < 0:
        raise UserError(f"--tokens: expected an integer >= 0, got {args.tokens}")
    if args.tokenizer:
        from ..data.tokens import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        ids, decode = tok.encode(args.prompt).ids, tok.decode
    else:
        if spec.num_classes < 256:
            raise UserError(f"model: {args.model!r} has a vocabulary of {spec.num_classes}, "
                            "not bytes (256); give the --tokenizer its token file was written "
                            "with")
        ids = list(args.prompt.encode("utf-8"))

        def decode(out):
            return bytes(int(i) for i in out if i < 256).decode("utf-8", errors="replace")
    out = generate(spec, host, ids, args.tokens, args.temperature, args.top_k, args.seed)
    emit(decode([int(i) for i in out]))
    return 0


def run_keys(args) -> int:
    from ..federated import identity
    from .main import DEALER_CAVEAT

    if args.keys_command == "new":
        public = identity.new_key(args.dir, args.institution, force=args.force)
        emit(public)
        log.info("wrote %r (mode 0600: keep it on this machine) and %r (send it to whoever "
                 "builds the roster)", identity.key_path(args.dir, args.institution),
                 identity.public_path(args.dir, args.institution))
    elif args.keys_command == "roster":
        path, sha256 = identity.write_roster(args.dir, args.institutions)
        emit(sha256)
        log.info("wrote %r for %d institutions; pin it: federated.keys_roster_sha256 = %r",
                 path, args.institutions, sha256)
    else:
        paths = identity.generate_keys(args.dir, args.institutions, force=args.force)
        with open(paths[-1], "rb") as fh:
            sha256 = identity.sha256_hex(fh.read())
        emit(f"wrote {len(paths) - 1} identity keys and {paths[-1]} (SHA-256 {sha256}); give "
             f"institution k only {args.dir}/site-<k>.key and the roster")
        emit(f"what this gives up: {DEALER_CAVEAT}")
    return 0


def run_data(args) -> int:
    """`mpifed data ...`: serial. Run alone (no launcher's variables), MPI is never started,
    so it works on a login node and costs no MPI start-up (Open MPI starts a helper daemon
    for a lone process: seconds); under mpiexec/srun rank 0 works while the others wait."""
    import os

    from ..train.launch_check import launched_tasks

    if launched_tasks(os.environ) is None:
        return _data_command(args)
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank != 0:  # data commands are serial; extra ranks just wait
        MPI.COMM_WORLD.Barrier()
        return 0
    try:
        return _data_command(args)
    finally:
        if MPI.COMM_WORLD.size > 1:
            MPI.COMM_WORLD.Barrier()


def _data_command(args) -> int:
    from ..data.inspect import inspect_lines
    from ..data.synth import write_digits, write_synthetic, write_synthetic_images
    from ..errors import UserError

    if args.data_command == "synth":
        def rows_written(done, total):
            progress(f"wrote {done:,}/{total:,} rows")
        if (args.features is None) == (args.shape is None):
            raise UserError("mpifed data synth: give exactly one of --features N and "
                            "--shape C,H,W")
        if args.shape is not None:
            try:
                shape = tuple(int(v) for v in args.shape.split(","))
            except ValueError:
                raise UserError(f"--shape {args.shape!r}: expected C,H,W, e.g. 3,32,32") from None
            write_synthetic_images(args.out, args.samples, shape, args.classes, args.seed,
                                   progress=rows_written, force=args.force)
            what = "x".join(map(str, shape)) + " images"
        else:
            write_synthetic(args.out, args.samples, args.features, args.classes, args.seed,
                            progress=rows_written, force=args.force)
            what = f"{args.features} features"
        emit(f"wrote {args.out}: {args.samples} samples x {what}, {args.classes} classes")
    elif args.data_command == "digits":
        train, test = write_digits(args.out_dir, seed=args.seed, force=args.force)
        emit(f"wrote {train} and {test}")
    elif args.data_command == "partition":
        emit("\n".join(partition_command(args)))
    elif args.data_command == "inspect":
        emit("\n".join(inspect_lines(args.file, args.y)))
    elif args.data_command == "from-numpy":
        emit(from_numpy_command(args))
    elif args.data_command == "tokens":
        emit(tokens_command(args))
    return 0


def tokens_command(args) -> str:
    from ..data.tokens import write_tokens
    from ..errors import UserError

    if len(args.files) < 2:
        raise UserError("mpifed data tokens: give TEXT [TEXT ...] OUT.h5 (got "
                        f"{len(args.files)} file name)")
    info = write_tokens(args.files[-1], args.files[:-1], args.tokenizer, args.force)
    return (f"wrote {info.path}: {info.tokens:,} tokens, vocabulary {info.vocab_size}; train "
            f"a GPT on it with data.train = \"{info.path}\" and model.kind = \"gpt\"")


def from_numpy_command(args) -> str:
    from ..data.from_numpy import convert
    from ..errors import UserError

    want = 1 if args.npz else 3
    if len(args.files) != want:
        raise UserError("mpifed data from-numpy: give X.npy Y.npy OUT.h5, or --npz FILE.npz "
                        f"OUT.h5 (got {len(args.files)} file name(s): {' '.join(args.files)})")
    x_path, y_path = (None, None) if args.npz else args.files[:2]

    def rows_written(done, total):
        progress(f"wrote {done:,}/{total:,} rows")
    done = convert(args.files[-1], x_path, y_path, args.npz, args.num_classes, args.force,
                   rows_written)
    shape = "x".join(map(str, done.sample_shape))
    return (f"wrote {done.path}: {done.samples} samples x {shape} {done.dtype}, "
            f"{done.num_classes} classes; train on it with data.train = \"{done.path}\"")


def partition_command(args) -> list[str]:
    import h5py

    from ..data.partition import split, write_partition
    from ..data.shards import describe
    from ..errors import UserError

    describe(args.input, args.x, args.y, key="input")  # clear errors for a bad input file
    sizes = None
    if args.sizes:
        try:
            sizes = [float(v) for v in args.sizes.split(",")]
        except ValueError:
            raise UserError(f"--sizes {args.sizes!r}: expected comma-separated fractions") from None
    with h5py.File(args.input, "r") as fh:
        labels = fh[args.y][...]
    parts = split(labels, args.institutions, args.scheme, args.seed, args.alpha,
                  args.classes_per_site, sizes)
    return write_partition(args.input, args.out_dir, parts, args.x, args.y, args.force)
