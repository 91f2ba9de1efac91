"""The `mpifed` command line.

    mpifed --version                                  mpifed <version>
    mpifed info                                       MPI, ranks, nodes, GPU facts
    mpifed demo                                       digits on 2 ranks, then FedAvg/FedProx
    mpifed demo --gpt                                 a tiny character-level GPT on 2 ranks
    mpiexec -n 4 mpifed train run.toml [--set k=v]    data-parallel training
    mpifed config show|validate|schema run.toml       the resolved config, a check, JSON Schema
    mpifed evaluate model.h5 test.h5                  loss and accuracy (alone or under mpiexec)
    mpifed data synth|digits|inspect ...              write or describe datasets
    mpifed data from-numpy X.npy Y.npy OUT.h5         your own arrays as a training file
    mpifed data tokens TEXT... OUT.h5                 a token file for a GPT (bytes, or --tokenizer)
    mpifed generate model.h5 --prompt TEXT            sample text from a trained GPT
    mpifed keys new K DIR                             institution K's identity key (its own machine)
    mpifed keys roster DIR --institutions N           the public roster and its SHA-256
    mpifed keys generate DIR --institutions N         every key from one dealer (tests, demos)
    mpiexec -n 4 mpifed bench allreduce [...]         all-reduce size sweep
    srun -n 4 mpifed bench scaling --data D --csv C   one point of a scaling sweep
    mpiexec -n 2 mpifed bench model --scaling-csv C   alpha-beta predictions to 1024 ranks
    mpifed bench suite|throughput|federated-round|gpu|cnn  suites that launch mpiexec themselves
    mpifed plot --run RUN_DIR | scaling.json [--allreduce ar.json]   PNG plots (matplotlib)

--quiet (warnings and errors only) and --verbose (debug too) go before or after the command;
MPIFED_LOG_LEVEL=debug|info|warning|error does the same for a job. A command's result and a
run's progress and final line are output, shown at every level.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..log import ENV, configure
from .failures import run_guarded

# `mpifed bench WHICH`: the module in mpifed/benchmarks/ whose main(argv) runs it. The first
# three run on the ranks of the launch; the others start mpiexec themselves (bench/*.py are the
# same entry points as scripts).
BENCHMARKS = {
    "allreduce": "allreduce", "scaling": "scaling", "model": "predict",
    "suite": "scaling_suite", "throughput": "train_throughput", "gpt": "gpt_throughput",
    "federated-round": "federated_round", "gpu": "gpu_throughput", "cnn": "cnn_throughput",
    "memory": "memory", "streaming": "streaming", "shuffle-order": "shuffle_order",
    "federated-goals": "federated_goals",
    "compression": "compression_link",
}

# What `mpifed keys generate` gives up, in its help and its output.
DEALER_CAVEAT = ("one dealer: the machine that ran it held every institution's private key, so "
                 "whoever controls it can sign as any institution; for tests and demos only. "
                 "In a real federation each institution K runs `mpifed keys new K DIR` on its own "
                 "machine and sends DIR/site-K.pub; then `mpifed keys roster DIR --institutions "
                 "N` writes the roster")


class ConfigKeysHelp(argparse.Action):
    """`mpifed train --help`: the usual help, then every config key with its accepted values,
    its default and one line of description, all from `mpifed/config/sections.py`."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show this help, with every config key, and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..config import describe_keys

        parser.epilog = describe_keys()
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpifed", description="Data-parallel and federated training over MPI.",
        epilog="Launch under MPI: mpiexec -n 4 mpifed train run.toml, or "
               "srun --mpi=pmi2 mpifed train run.toml")
    parser.add_argument("--version", action="version", version=f"mpifed {__version__}",
                        help="print mpifed's version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    add_log_flags(parser, default=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="print the MPI library, rank and node counts, GPU facts")
    demo = sub.add_parser("demo", help="train the digits MLP on 2 local ranks, then compare "
                                       "FedAvg, FedProx and centralised training (make demo)")
    demo.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    demo.add_argument("--ranks", type=int, default=2,
                      help="ranks of the data-parallel run (default 2)")
    demo.add_argument("--gpt", action="store_true",
                      help="instead: a tiny character-level GPT on mpifed's own sources, about "
                           "a minute on 2 ranks, then a sample of its text (make demo-gpt)")

    from ..data.partition import SCHEMES

    train = sub.add_parser(
        "train", help="train a model (data-parallel, or federated with [federated])",
        description="Train from a TOML config: sections [data], [model], [optim], [comm], [run], "
                    "and [federated] for a federation. Launch under MPI: mpiexec -n 4 mpifed "
                    "train run.toml. The keys, their accepted values and defaults are listed below.",
        formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    train.add_argument("-h", "--help", action=ConfigKeysHelp)
    train.add_argument("config", help="TOML config file")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a config value (a TOML value; a bare word is a string); "
                            "repeatable")
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks of errors")

    add_config_parser(sub)

    ev = sub.add_parser("evaluate", help="print loss and accuracy of a model file on a dataset")
    ev.add_argument("model", help="model file (HDF5, written by mpifed train)")
    ev.add_argument("data", help="dataset file (HDF5 with x and y)")
    ev.add_argument("--x", default="x", help="features dataset name (default x)")
    ev.add_argument("--y", default="y", help="labels dataset name (default y)")

    gen = sub.add_parser(
        "generate", help="sample text from a GPT model file",
        description="Continue --prompt with --tokens tokens sampled from a GPT written by mpifed "
                    "train (model.kind = \"gpt\"): the context cropped to block_size, logits "
                    "divided by --temperature (0: always the most likely token), only the --top-k "
                    "most likely kept. Text is bytes (a byte-level model, vocabulary 256) unless "
                    "--tokenizer names the tokenizers JSON file the token file was written with.")
    gen.add_argument("model", help="model file (HDF5) of a GPT")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--tokens", type=int, default=200, help="tokens to add (default 200)")
    gen.add_argument("--temperature", type=float, default=1.0, help="default 1.0")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely (0: all)")
    gen.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    gen.add_argument("--tokenizer", default=None, metavar="FILE.json",
                     help="a tokenizers JSON file (default: bytes)")

    data = sub.add_parser("data", help="write or inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = data_sub.add_parser("synth", help="write a learnable synthetic set (streamed)")
    synth.add_argument("out", help="output HDF5 file")
    synth.add_argument("--samples", type=int, required=True)
    synth.add_argument("--features", type=int, default=None,
                       help="flat rows of this many features (Gaussian blobs)")
    synth.add_argument("--shape", default=None, metavar="C,H,W",
                       help="images of this shape instead, e.g. 3,32,32 (class patterns at "
                            "random places: a convnet beats a linear model)")
    synth.add_argument("--classes", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--force", action="store_true", help="replace an existing file")
    digits = data_sub.add_parser("digits", help="write scikit-learn's handwritten digits "
                                                "(OUT_DIR/train.h5, OUT_DIR/test.h5)")
    digits.add_argument("out_dir")
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--force", action="store_true", help="replace existing files")
    part = data_sub.add_parser(
        "partition", help="split a dataset into institutions (site-<k>.h5)",
        description="Write OUT_DIR/site-0.h5 ... and a table of per-site class counts (also "
                    "OUT_DIR/partition.csv). Every row goes to exactly one site. iid: near-equal "
                    "random parts. dirichlet: each class split over the sites by Dirichlet(alpha) "
                    "shares. pathological: each site holds at most C classes "
                    "(--classes-per-site), and each class's rows are split evenly among the "
                    "sites that hold it (needs sites x C >= the class count). sizes: site k gets "
                    "the k-th fraction of the rows, at random.")
    part.add_argument("input", help="input HDF5 file")
    part.add_argument("out_dir")
    part.add_argument("--institutions", type=int, required=True)
    part.add_argument("--scheme", default="iid", choices=SCHEMES)
    part.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    part.add_argument("--classes-per-site", type=int, default=2,
                      help="pathological: C, the most classes any site holds (default 2)")
    part.add_argument("--sizes", default=None, help="sizes: fractions, e.g. 0.5,0.3,0.2")
    part.add_argument("--seed", type=int, default=0)
    part.add_argument("--force", action="store_true",
                      help="replace the site files already in OUT_DIR")
    part.add_argument("--x", default="x")
    part.add_argument("--y", default="y")
    npy = data_sub.add_parser(
        "from-numpy", help="write your own NumPy arrays as a training file (HDF5)",
        usage="mpifed data from-numpy (X.npy Y.npy | --npz FILE.npz) OUT.h5 [--num-classes N] "
              "[--force]",
        description="Write OUT.h5 from X.npy (features: rows x features, or rows x C x H x W) "
                    "and Y.npy (integer labels, one per row), or from an .npz file with arrays "
                    "x and y: dataset x (float32, or the input's float dtype) in ~1 MiB chunks "
                    "of whole rows, dataset y (int64), attribute num_classes. Checks finite "
                    "features and labels 0..N-1; .npy files are copied in row blocks, never "
                    "read whole.")
    npy.add_argument("files", nargs="+", metavar="FILE",
                     help="X.npy Y.npy OUT.h5, or OUT.h5 alone with --npz")
    npy.add_argument("--npz", default=None, metavar="FILE.npz",
                     help="read arrays x and y from this .npz file (np.savez(path, x=.., y=..))")
    npy.add_argument("--num-classes", type=int, default=None, metavar="N",
                     help="the class count (default: the largest label + 1)")
    npy.add_argument("--force", action="store_true", help="replace an existing OUT.h5")
    toks = data_sub.add_parser(
        "tokens", help="write a token file (HDF5) for a GPT from text files",
        usage="mpifed data tokens TEXT [TEXT ...] OUT.h5 [--tokenizer FILE.json] [--force]",
        description="Write OUT.h5 with a 1-D dataset tokens and attribute vocab_size: by "
                    "default one token per byte of the text files, in file order (vocabulary "
                    "256, nothing downloaded); with --tokenizer, the ids of a tokenizer file you "
                    "already have, in the `tokenizers` library's JSON format (that library must "
                    "be installed).")
    toks.add_argument("files", nargs="+", metavar="FILE", help="TEXT [TEXT ...] OUT.h5")
    toks.add_argument("--tokenizer", default=None, metavar="FILE.json",
                      help="a tokenizers JSON file (default: bytes, vocabulary 256)")
    toks.add_argument("--force", action="store_true", help="replace an existing OUT.h5")
    insp = data_sub.add_parser("inspect", help="print shapes, dtypes and class counts")
    insp.add_argument("file")
    insp.add_argument("--y", default="y", help="labels dataset name (default y)")

    keys = sub.add_parser("keys", help="identity keys for authenticated secure aggregation")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    new = keys_sub.add_parser(
        "new", help="write institution K's DIR/site-K.key (mode 0600) and DIR/site-K.pub",
        description="Run by institution K on its own machine: one Ed25519 identity key, the "
                    "private half in DIR/site-K.key (mode 0600; it never leaves this machine), "
                    "the public half in DIR/site-K.pub, also printed. Send site-K.pub to whoever "
                    "builds the roster (mpifed keys roster).")
    new.add_argument("institution", type=int, metavar="K", help="this institution (from 0)")
    new.add_argument("dir", help="output folder")
    new.add_argument("--force", action="store_true", help="replace this institution's key")
    roster = keys_sub.add_parser(
        "roster", help="write DIR/roster.toml from DIR/site-<k>.pub and print its SHA-256",
        description="Read DIR/site-0.pub ... site-(N-1).pub (from mpifed keys new), refuse "
                    "missing or malformed files and a key listed twice, write DIR/roster.toml "
                    "and print the SHA-256 of its bytes. Give every institution the roster and "
                    "set federated.keys = \"DIR\" and federated.keys_roster_sha256 to that hash: "
                    "each leader then refuses any other roster.")
    roster.add_argument("dir", help="folder of the site-<k>.pub files")
    roster.add_argument("--institutions", type=int, required=True, metavar="N")
    gen = keys_sub.add_parser(
        "generate", help="every institution's key from one dealer (tests and demos only)",
        description="One Ed25519 identity key per institution (DIR/site-<k>.key, mode 0600) and "
                    "the public roster DIR/roster.toml. Give institution k only DIR/site-<k>.key "
                    "and the roster; set federated.keys = \"DIR\" to sign and check every "
                    f"round's keys. What it gives up: {DEALER_CAVEAT}.")
    gen.add_argument("dir", help="output folder")
    gen.add_argument("--institutions", type=int, required=True)
    gen.add_argument("--force", action="store_true", help="replace existing keys")

    plot = sub.add_parser("plot", help="PNG plots of a run's curves, scaling and all-reduce results",
                          description="PNG plots (needs matplotlib). --run RUN_DIR: the run's loss "
                          "and accuracy against steps (rounds for a federation), and each "
                          "institution folder's own figures written into that folder. SCALING "
                          "and --allreduce: the benchmark plots of docs/performance.md.")
    plot.add_argument("scaling", nargs="?",
                      help="scaling.json from mpifed bench suite (bench/scaling.py), or the held-out "
                           "table of mpifed bench model --fit ... --json")
    plot.add_argument("--allreduce", nargs="*", metavar="JSON",
                      help="JSON files from mpifed bench allreduce --json")
    plot.add_argument("--run", metavar="RUN_DIR",
                      help="a training run's folder (run.out): loss.png and accuracy.png")
    plot.add_argument("--out", default=None,
                      help="folder for the PNG files (default: RUN_DIR with --run, else .)")

    bench = sub.add_parser("bench", help=f"run a benchmark ({', '.join(BENCHMARKS)})")
    bench.add_argument("which", choices=list(BENCHMARKS), help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="its options (see --help of each)")
    for command in sub_commands(parser):  # `mpifed train run.toml --quiet` works too
        add_log_flags(command, default=argparse.SUPPRESS)
    return parser


def add_log_flags(parser, default) -> None:
    """Add --quiet and --verbose to `parser`, both setting `log_level` (the last one wins)."""
    parser.add_argument("-q", "--quiet", dest="log_level", action="store_const",
                        const="warning", default=default,
                        help="show warnings and errors only (not the info notices)")
    parser.add_argument("-v", "--verbose", dest="log_level", action="store_const",
                        const="debug", default=argparse.SUPPRESS, help="show debug messages too")


def sub_commands(parser):
    """Yield every sub-command parser below `parser`, at every depth (`data synth` too)."""
    for action in parser._actions:  # argparse keeps them there; it offers no public listing
        if isinstance(action, argparse._SubParsersAction):
            for command in dict.fromkeys(action.choices.values()):
                yield command
                yield from sub_commands(command)


def add_config_parser(sub) -> None:
    """`mpifed config show|validate|schema|reference`: the configuration without starting MPI."""
    config = sub.add_parser(
        "config", help="print the resolved config, check it, or print its JSON Schema",
        description="Read a run configuration without starting MPI (on a login node, in CI). "
                    "show: every key with its value, defaults included, as TOML. validate: exit "
                    "0 if the file loads, else 1 with the message. schema: the JSON Schema "
                    "(for editors: docs/reference/config.schema.json). reference: the "
                    "configuration reference page (docs/reference/configuration.md).")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    for name, text in (("show", "print the resolved configuration (every key) as TOML"),
                       ("validate", "check a configuration: exit 0, or 1 with the message")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("config", help="TOML config file")
        action.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                            help="override a config value, as for mpifed train; repeatable")
    actions.add_parser("schema", help="print the JSON Schema of a configuration file")
    actions.add_parser("reference", help="print the configuration reference (Markdown)")


def dispatch(args) -> int:
    from . import commands

    if args.command == "info":
        from .info import run_info

        return run_info(args)
    if args.command == "plot":
        from .plot import run_plot

        return run_plot(args)
    if args.command == "demo":
        if args.gpt:
            from .demo_gpt import main as run_gpt_demo

            return run_gpt_demo(out=args.out, ranks=args.ranks)
        from .demo import main as run_demo

        return run_demo(out=args.out, ranks=args.ranks)
    if args.command == "bench":
        import importlib

        module = importlib.import_module(f"..benchmarks.{BENCHMARKS[args.which]}", __package__)
        return module.main(args.rest)
    return {"train": commands.run_train, "evaluate": commands.run_evaluate,
            "generate": commands.run_generate,
            "data": commands.run_data, "keys": commands.run_keys,
            "config": commands.run_config}[args.command](args)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return run_guarded(lambda: dispatch(configured(args)), debug=args.debug)


def configured(args):
    """Set the log level from --quiet/--verbose, else MPIFED_LOG_LEVEL; return `args`.

    A flag also goes into MPIFED_LOG_LEVEL, so that the runs `mpifed demo` and the benchmark
    suites launch follow it.
    """
    if args.log_level is not None:
        os.environ[ENV] = args.log_level
    configure(args.log_level)
    return args


if __name__ == "__main__":
    sys.exit(main())
