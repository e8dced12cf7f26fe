"""The CUDA-graph step's host-side pieces, on CPU: learning rate as a tensor the graph reads, the
optimizer made capturable, checkpoints that stay portable. (The capture itself: tests/test_train_gpu.py.)"""

import torch

from moeco.train.cuda_graph import make_capturable, portable_state_dict, set_lr
from moeco.train.optim import AdamWBF16Moments


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]


def test_set_lr_fills_tensors_in_place_and_replaces_numbers():
    ps = _params()
    opt = torch.optim.AdamW([{"params": ps[:1]}, {"params": ps[1:]}], lr=1e-3)
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 2e-3]
    t = torch.tensor(0.0)
    opt.param_groups[0]["lr"] = t
    set_lr(opt, 5e-4)
    assert opt.param_groups[0]["lr"] is t and t.item() == torch.tensor(5e-4).item()
    assert opt.param_groups[1]["lr"] == 5e-4


def test_make_capturable_then_portable_state_dict():
    for cls in (torch.optim.AdamW, AdamWBF16Moments):
        ps = _params()
        opt = cls(ps, lr=1e-3)
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        make_capturable(opt, torch.device("cpu"))
        group = opt.param_groups[0]
        assert group["capturable"] and torch.is_tensor(group["lr"])
        assert all(torch.is_tensor(opt.state[p]["step"]) for p in ps)
        sd = portable_state_dict(opt)
        assert sd["param_groups"][0]["lr"] == group["lr"].item() and not sd["param_groups"][0]["capturable"]
        assert torch.is_tensor(group["lr"]) and group["capturable"]  # the live optimizer is untouched
        fresh = cls(_params(), lr=1e-3)
        fresh.load_state_dict(sd)  # resumes as a plain (eager) optimizer
        assert not torch.is_tensor(fresh.param_groups[0]["lr"])
