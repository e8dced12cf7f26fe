"""Expert parallelism over torch.distributed, applied to a moeco model from outside.

    mesh.py       ranks as nodes x GPUs per node (torchrun's environment), EP / DP / intra-node groups
    dist.py       the process-group bookkeeping every entry point shares (rank, world, device)
    route.py      rows moved by gathers and all-to-alls, autograd-correct; byte counters
    dispatch.py   the all-to-all and two-hop dispatchers (the model's Dispatcher protocol)
    expert_parallel.py  shard a model's routed experts over an EP group; gradients and norms across shards
    checkpoint.py sharded checkpoints in the Hugging Face layout; optimizer state free of the EP size
    traffic.py    the rows each dispatcher sends, from a routing alone (the byte counters' formula)
    eplb.py       expert-parallel load balancing: replicas of hot experts placed over nodes and GPUs

The model never calls torch.distributed: `apply_expert_parallel(model, mesh)` swaps each MoE's
experts for the rank's range and its dispatcher for an all-to-all one.
"""

from moeco.parallel.dist import Dist
from moeco.parallel.mesh import Mesh, MeshSpec

__all__ = ["Dist", "Mesh", "MeshSpec"]
