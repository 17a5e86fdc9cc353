import torch


def lgm_inputs(n, k, d, *, dtype=torch.float64, device="cpu", identity=False, seed=0, spread=1.0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    mu = spread * torch.randn(k, d, generator=g, dtype=dtype)
    s = None if identity else 0.4 * torch.randn(k, d, generator=g, dtype=dtype)
    y = torch.randint(0, k, (n,), generator=g)
    out = [t.to(device) if t is not None else None for t in (x, mu, s, y)]
    if requires_grad:
        for t in out[:3]:
            if t is not None:
                t.requires_grad_()
    return out


def noncontiguous(t):
    """Same values, non-contiguous storage (every other column of a wider tensor)."""
    if t is None:
        return None
    wide = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
    wide[:, ::2] = t.detach()
    v = wide[:, ::2]
    assert not v.is_contiguous()
    return v.requires_grad_(t.requires_grad)
