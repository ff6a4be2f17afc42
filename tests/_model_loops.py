"""Plain per-step loops of the built-in scan models, written from the papers' recurrences and
independent of tbptt.models.scan: each step updates the state from the previous one, in real
arithmetic (LRU's complex state as real and imaginary parts). They read the models' parameters and
return the outputs and the state in the model's own layout, so the two can be compared."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tbptt


def _g(x):
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def mingru_step(block, x, h):
    k, candidate = block.proj(x).chunk(2, dim=-1)
    z = torch.sigmoid(k)
    h = (1 - z) * h + z * _g(candidate)
    return h, h


def minlstm_step(block, x, h):
    k_forget, k_input, candidate = block.proj(x).chunk(3, dim=-1)
    f, i = torch.sigmoid(k_forget), torch.sigmoid(k_input)
    h = f / (f + i) * h + i / (f + i) * _g(candidate)
    return h, h


def lru_step(block, x, state):
    """One step of h <- lambda h + gamma B x, y = Re(C h) + D x, as real and imaginary parts."""
    n = block.state_size
    h_re, h_im = state[:, :n], state[:, n:]
    modulus = torch.exp(-torch.exp(block.nu_log))
    phase = torch.exp(block.theta_log)
    lam_re, lam_im = modulus * torch.cos(phase), modulus * torch.sin(phase)
    gamma = torch.exp(block.gamma_log)
    bx_re, bx_im = x @ block.B_re.T, x @ block.B_im.T
    h_re, h_im = (lam_re * h_re - lam_im * h_im + gamma * bx_re,
                  lam_re * h_im + lam_im * h_re + gamma * bx_im)
    y = h_re @ block.C_re.T - h_im @ block.C_im.T + block.D * x
    y = F.gelu(y)
    a, b = block.glu(y).chunk(2, dim=-1)
    return a * torch.sigmoid(b), torch.cat([h_re, h_im], dim=1)


def mamba_step(block, u, state):
    """One step: the convolution over the last W inputs, then h <- exp(dA) h + ZOH(B) x."""
    batch = u.shape[0]
    channels, n, width = block.channels, block.state_size, block.conv_width
    history, h = state
    history = history.reshape(batch, width - 1, channels)
    h = h.reshape(batch, channels, n)
    x, z = block.in_proj(u).chunk(2, dim=-1)
    window = torch.cat([history, x[:, None]], dim=1)  # [B, W, E], oldest first
    kernel = block.conv.weight[:, 0, :]  # [E, W]
    conv = sum(window[:, j] * kernel[:, j] for j in range(width)) + block.conv.bias
    x = F.silu(conv)
    rank = block.dt_proj.in_features
    dt_in, B, C = block.x_proj(x).split([rank, n, n], dim=-1)
    delta = F.softplus(block.dt_proj(dt_in))  # [B, E]
    A = -torch.exp(block.A_log)
    dA = delta[:, :, None] * A  # [B, E, N]
    h = torch.exp(dA) * h + torch.expm1(dA) / A * B[:, None, :] * x[:, :, None]
    y = (h * C[:, None, :]).sum(-1) + block.D * x
    out = block.out_proj(y * F.silu(z))
    return out, (window[:, 1:].reshape(batch, -1), h.reshape(batch, -1))


STEPS = {
    tbptt.MinGRU: mingru_step,
    tbptt.MinLSTM: minlstm_step,
    tbptt.LRU: lru_step,
    tbptt.Mamba: mamba_step,
}


def step_by_step(model, x, state=None):
    """The model's outputs and final state from a Python loop over the steps of x[B, T, F]."""
    step = STEPS[type(model)]
    batch = x.shape[0]
    if state is None:
        state = tuple(tbptt.state.map_tensors(lambda s: s.clone(), b.zero_state(batch, x)) for b in model.blocks)
    state = [tbptt.state.map_tensors(lambda s: s.clone(), s) for s in state]
    outputs = []
    for t in range(x.shape[1]):
        u = x[:, t] if model.encoder is None else model.encoder(x[:, t])
        for i, block in enumerate(model.blocks):
            y, state[i] = step(block, model.norms[i](u), state[i])
            u = y if i == 0 and model.encoder is None else u + y
        outputs.append(model.head(model.final_norm(u)))
    return torch.stack(outputs, dim=1), tuple(state)


SCAN_MODELS = ("mingru", "minlstm", "mingru-log", "minlstm-log", "lru", "mamba")
SMALL = {"mingru": {}, "minlstm": {}, "lru": {"state_size": 3}, "mamba": {"state_size": 3, "conv_width": 3},
         # the same models with the paper's log-space scan in place of the default linear one
         "mingru-log": {"scan": "log"}, "minlstm-log": {"scan": "log"}}


def make_scan_model(name, seed, layers=1, dtype=torch.float64, hidden=4, n_in=3, n_out=2, **options):
    """A small built-in scan model, seeded, in ``dtype``."""
    torch.manual_seed(seed)
    model = tbptt.models.build_model(name.removesuffix("-log"), n_inputs=n_in, n_outputs=n_out, hidden=hidden,
                                     layers=layers, **{**SMALL[name], **options})
    return model.to(dtype)


def one_thread():
    """A fixture body: torch on one thread for the module's tests (tiny tensors, where a second
    thread only adds synchronisation), the previous setting restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
