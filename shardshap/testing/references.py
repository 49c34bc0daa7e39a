"""References the library is checked against: the plain training step, and equality of training state."""
import copy

import torch


def plain_step(model, opt, train_loss, micro, clip):
    """zero_grad; backward over the micro-batches (mean over the step's samples); clip; step."""
    opt.zero_grad()
    if len(micro) == 1:
        train_loss(model, micro[0]).mean().backward()
    else:
        n = sum(mb[0].shape[0] for mb in micro)
        for mb in micro:
            (train_loss(model, mb).sum() / n).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def assert_same(m1, o1, m2, o2):
    """Parameters and optimizer state bit-identical."""
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), f"parameter {n} differs by {(p - q).abs().max().item():.3e}"
    for p, q in zip(m1.parameters(), m2.parameters()):
        s1, s2 = o1.state.get(p, {}), o2.state.get(q, {})
        assert s1.keys() == s2.keys()
        for k in s1:
            assert torch.equal(torch.as_tensor(s1[k]), torch.as_tensor(s2[k])), f"optimizer state {k} differs"


def assert_training_unchanged(case, opt, config=None, steps: int = 3, clip=None, seed: int = 123):
    """`steps` attributed steps of `case` leave parameters and optimizer state bit-identical to plain steps on
    copies of (model, optimizer) drawing the same random numbers (dropout); `clip`: the plain step's
    clip_grad_norm_ threshold (Config.max_grad_norm of the attributed side)."""
    from ..attributor import Attributor
    ref_model, ref_opt = copy.deepcopy((case.model, opt))
    attr = Attributor(case.model, opt, case.train_loss, case.target_loss, config)
    torch.manual_seed(seed)
    for s in range(steps):
        attr.step(*case.batches(s), None)
    attr.close()
    torch.manual_seed(seed)
    for s in range(steps):
        plain_step(ref_model, ref_opt, case.train_loss, [case.batches(s)[0]], clip)
    assert_same(case.model, opt, ref_model, ref_opt)
