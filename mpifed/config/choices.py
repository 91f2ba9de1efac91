"""The accepted words of choice keys whose implementing modules import MPI.

The configuration must load (`mpifed config show`) without starting MPI, so these tuples live
here and the implementing modules import them (`comm.collectives.ALGORITHMS`, the step
registry); tests/unit/test_config.py checks that each registry serves exactly these names.
"""

ALGORITHMS = ("auto", "ring", "mpi", "hierarchical", "nccl")  # comm.allreduce
STAGES = ("none", "optimizer", "gradients", "parameters")  # comm.shard: ZeRO stage 0 to 3
