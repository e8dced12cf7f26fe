"""The mesh and its one-line errors: checked from the environment and config alone, on every rank alike."""

from __future__ import annotations

import pytest

from helpers import micro_config
from moeco.errors import ConfigError, LoadError
from moeco.parallel.mesh import MeshSpec


def env(world, rank=0, local=None):
    return {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_WORLD_SIZE": str(local or world)}


def test_layout_two_nodes_of_two():
    s = MeshSpec.from_env(ep=4, gpus_per_node=2, env=env(4, rank=3))
    assert (s.ep_nodes, s.ep_gpus_per_node, s.ep_rank, s.node_of(3)) == (2, 2, 3, 1)
    s = MeshSpec.from_env(ep=2, gpus_per_node=0, env=env(8, rank=5, local=4))
    assert (s.gpus_per_node, s.ep_nodes, s.ep_gpus_per_node, s.ep_rank, s.ep_ranks()) == (4, 1, 2, 1, [4, 5])
    assert MeshSpec.from_env(ep=4, gpus_per_node=1, env=env(4)).max_nodes_per_token(micro_config()) == 2


@pytest.mark.parametrize("ep, gpn, world, local, words", [
    (3, 2, 4, 4, "parallel.ep = 3 must be a positive divisor of the 4 ranks"),
    (4, 3, 4, 4, "parallel.gpus_per_node = 3 does not divide torchrun's --nproc-per-node = 4"),
    (6, 4, 12, 12, "parallel.ep = 6 spans a partial node"),
])
def test_bad_mesh_is_one_line(ep, gpn, world, local, words):
    with pytest.raises(ConfigError, match=words) as info:
        MeshSpec.from_env(ep=ep, gpus_per_node=gpn, env=env(world, local=local))
    assert "\n" not in str(info.value)


def test_experts_and_groups_must_map_onto_the_mesh():
    spec = MeshSpec.from_env(ep=4, gpus_per_node=1, env=env(4))  # 4 nodes
    with pytest.raises(ConfigError, match="does not divide the 6 routed experts"):
        MeshSpec.from_env(ep=4, gpus_per_node=2, env=env(4)).check_model(
            micro_config(n_routed_experts=6, n_group=3, topk_group=1, num_experts_per_tok=2))
    with pytest.raises(ConfigError, match=r"model.n_group = 2 routing groups cannot lie on whole nodes of the 4"):
        spec.check_model(micro_config(n_group=2, topk_group=2))
    spec.check_model(micro_config(n_group=1, topk_group=1))  # no group limit: any placement is valid
    spec.check_model(micro_config())


def test_load_pretrained_ep_errors(tmp_path):
    import torch

    from moeco import Transformer, load_pretrained

    torch.manual_seed(0)
    model = Transformer(micro_config())
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="parallel.ep = 3 does not divide the 8 routed experts"):
        load_pretrained(tmp_path / "m", ep_rank=0, ep_size=3)
    with pytest.raises(LoadError, match="ep_rank = 4"):
        load_pretrained(tmp_path / "m", ep_rank=4, ep_size=4)
    part = load_pretrained(tmp_path / "m", ep_rank=3, ep_size=4)
    for (_, a), (_, b) in zip(part.moe_layers(), model.moe_layers()):
        assert a.experts.first_expert == 6 and torch.equal(a.experts.w2_EDF, b.experts.w2_EDF[6:8])
