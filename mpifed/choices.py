"""The accepted words of the choice keys whose implementing modules sit above the
configuration (they import MPI, or are the training loop's own).

The configuration must load without MPI (`mpifed config show` on a login node) and import only
downward, so these tuples live at the bottom, beside `errors.py`; the implementing modules
import them from here, and tests/unit/test_config.py checks each registry serves exactly them.
"""

ALGORITHMS = ("auto", "ring", "mpi", "hierarchical", "nccl")  # comm.allreduce
STAGES = ("none", "optimizer", "gradients", "parameters")  # comm.shard: ZeRO stage 0 to 3
RESUME_MODES = ("auto", "never")  # run.resume, besides the path of a checkpoint
PROGRESS_MODES = ("auto", "bar", "lines", "none")  # run.progress
COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")  # comm.compression (comm/compression/)
CONV_BACKENDS = ("native", "cudnn")  # model.conv_backend (cudnn: refused, train/precision.py)
