"""The workloads: small pieces of GPT-2 training that a fusing compiler should speed up, and one whole step.

Each workload turns (dims, dtype, device, seed) into plain input tensors and, for a backend name
("eager", "torch.compile", "lazygraph"), into a Step. The harness owns timing and checking; a
workload only says what to compute. Every backend of one workload sees the same input values,
and "eager" in float64 is the numerics reference.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lazygraph

Dims = dict[str, int]
BACKENDS = ("eager", "torch.compile", "lazygraph")


class Unavailable(RuntimeError):
    """A workload cannot run here (a missing package): reported as n/a, not as a failure."""


class Step:
    """One iteration of a workload under one backend.

    prepare(inputs) -> args      untimed: copy the inputs, make them lazy, mark requires_grad
    run(args) -> outputs         timed: the work itself; may leave lazy tensors pending
    finish(outputs) -> tensors   timed: force pending work, return plain tensors
    The first `n_compare` tensors of finish() are checked against the float64 reference.
    """

    n_compare: int | None = None
    note: str = ""  # said in the report (what this backend's numbers cover)

    def prepare(self, inputs: Sequence[torch.Tensor]) -> list:
        return list(inputs)

    def run(self, args: list) -> list[torch.Tensor]:
        raise NotImplementedError

    def finish(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [o.detach() for o in outputs]

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.finish(self.run(self.prepare(inputs)))


def _float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


class FunctionStep(Step):
    """out = fn(*args); with gradients also out.backward(cotangent), and the grads of `grad_args`."""

    def __init__(self, fn: Callable, grad_args: tuple[int, ...], backend: str):
        self.backend = backend
        self.grad_args = grad_args
        self.fn = torch.compile(fn) if backend == "torch.compile" else fn

    def prepare(self, inputs):
        # the last input is the cotangent when the workload has a backward
        args = []
        for i, t in enumerate(inputs):
            t = t.detach().clone()
            if self.backend == "lazygraph":
                t = lazygraph.lazy(t)
            if i in self.grad_args:
                t.requires_grad_(True)
            args.append(t)
        return args

    def run(self, args):
        if not self.grad_args:
            return [self.fn(*args)]
        *xs, cot = args
        out = self.fn(*xs)
        out.backward(cot)
        return [out] + [xs[i].grad for i in self.grad_args]

    def finish(self, outputs):
        if self.backend == "lazygraph":
            lazygraph.sync(*outputs)
            return [lazygraph.to_eager(o).detach() for o in outputs]
        return [o.detach() for o in outputs]


@dataclass
class Workload:
    name: str
    description: str
    sizes: dict[str, Dims]  # "small" (CPU, tests) and "large" (GPU)
    make_inputs: Callable[[Dims, torch.dtype, torch.device, torch.Generator], list[torch.Tensor]]
    fn: Callable | None = None  # for function workloads
    grad_args: tuple[int, ...] = ()  # inputs that get gradients; empty: forward only
    make_step: Callable[[str, Dims, torch.dtype, torch.device], Step] | None = None  # for the others

    def inputs(self, dims: Dims, dtype: torch.dtype, device: torch.device, seed: int) -> list[torch.Tensor]:
        gen = torch.Generator(device=device).manual_seed(seed)
        return [_float(t, dtype) for t in self.make_inputs(dims, dtype, device, gen)]

    def step(self, backend: str, dims: Dims, dtype: torch.dtype, device: torch.device) -> Step:
        if self.make_step is not None:
            return self.make_step(backend, dims, dtype, device)
        return FunctionStep(self.fn, self.grad_args, backend)


def _randn(gen, device, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=device) * scale


def _causal_mask(T: int, device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


# -- attention scores: scale + causal mask + softmax -------------------------------------------------


def attn_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / math.sqrt(64)
    return torch.softmax((scores * scale).masked_fill(~mask, float("-inf")), dim=-1)


def _attn_scores_inputs(d, dtype, device, gen):
    return [_randn(gen, device, d["B"], d["H"], d["T"], d["T"], scale=4.0), _causal_mask(d["T"], device)]


# -- layernorm forward and backward ------------------------------------------------------------------


def layernorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _layernorm_inputs(d, dtype, device, gen):
    N, C = d["N"], d["C"]
    return [_randn(gen, device, N, C, scale=2.0) + 0.5, 1 + _randn(gen, device, C, scale=0.1),
            _randn(gen, device, C, scale=0.1), _randn(gen, device, N, C)]


# -- bias + GELU ---------------------------------------------------------------------------------------


def bias_gelu(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + b, approximate="tanh")


def _bias_gelu_inputs(d, dtype, device, gen):
    return [_randn(gen, device, d["N"], d["C"], scale=2.0), _randn(gen, device, d["C"], scale=0.1)]


# -- cross-entropy from logits, forward and backward -------------------------------------------------


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def _cross_entropy_inputs(d, dtype, device, gen):
    N, V = d["N"], d["V"]
    targets = torch.randint(0, V, (N,), generator=gen, device=device)
    return [_randn(gen, device, N, V, scale=3.0), targets, torch.ones((), device=device)]


# -- one attention block, attention written out op by op ---------------------------------------------


def attn_block(x, w_qkv, b_qkv, w_proj, b_proj, mask, n_head: int = 0) -> torch.Tensor:
    B, T, C = x.shape
    H = n_head or max(1, C // 64)
    hd = C // H
    q, k, v = F.linear(x, w_qkv, b_qkv).split(C, dim=2)
    q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
    att = att.masked_fill(~mask[:T, :T], float("-inf"))
    att = torch.softmax(att, dim=-1)
    y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
    return F.linear(y, w_proj, b_proj)


def _attn_block_inputs(d, dtype, device, gen):
    B, T, C = d["B"], d["T"], d["C"]
    s = 1.0 / math.sqrt(C)
    return [_randn(gen, device, B, T, C),
            _randn(gen, device, 3 * C, C, scale=s), _randn(gen, device, 3 * C, scale=0.1),
            _randn(gen, device, C, C, scale=s), _randn(gen, device, C, scale=0.1),
            _causal_mask(T, device), _randn(gen, device, B, T, C)]


def _attn_block_fn(d: Dims) -> Callable:
    # the head count is part of the workload's size, not an input tensor
    H = d["H"]

    def fn(x, w_qkv, b_qkv, w_proj, b_proj, mask):
        return attn_block(x, w_qkv, b_qkv, w_proj, b_proj, mask, n_head=H)

    return fn


def _attn_block_step(backend, d, dtype, device):
    return FunctionStep(_attn_block_fn(d), (0, 1, 2, 3, 4), backend)


# -- a GPT-2 training step: forward, loss, backward, AdamW ------------------------------------------------


def _gpt2_classes():
    """GPT and GPTConfig from gpt2.model (being rewritten elsewhere: import on demand, fail clearly)."""
    try:
        from gpt2.model import GPT, GPTConfig
    except Exception as e:  # noqa: BLE001 - any import problem means "not available here"
        raise Unavailable(f"gpt2.model not importable: {type(e).__name__}: {e}") from e
    return GPT, GPTConfig


def _gpt2_inputs(d, dtype, device, gen):
    idx = torch.randint(0, d["V"], (d["B"], d["T"] + 1), generator=gen, device=device)
    return [idx[:, :-1].contiguous(), idx[:, 1:].contiguous()]


_GPT_TEMPLATES: dict[tuple, torch.nn.Module] = {}


def _gpt2_model(d: Dims) -> torch.nn.Module:
    """The same initial weights for every backend: built once per size, deep-copied per step."""
    key = tuple(sorted(d.items()))
    if key not in _GPT_TEMPLATES:
        GPT, GPTConfig = _gpt2_classes()
        cfg = GPTConfig(block_size=d["T"], vocab_size=d["V"], n_layer=d["L"], n_head=d["H"], n_embd=d["C"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            _GPT_TEMPLATES.clear()  # keep one model alive at a time (GPT-2 small is 0.5 GB)
            _GPT_TEMPLATES[key] = GPT(cfg)
    return _GPT_TEMPLATES[key]


class GPT2TrainStep(Step):
    """zero_grad, loss = model(idx, targets), backward, AdamW step. Compares the loss and the grads."""

    def __init__(self, backend: str, d: Dims, dtype: torch.dtype, device: torch.device):
        self.backend = backend
        model = copy.deepcopy(_gpt2_model(d)).to(device=device, dtype=dtype)
        self.params = [p for p in model.parameters()]
        self.n_compare = 1 + len(self.params)
        if backend == "torch.compile":
            self.model = torch.compile(model)
        elif backend == "lazygraph" and hasattr(lazygraph, "compile"):
            self.model = lazygraph.compile(model)
            self.note = "lazygraph.compile runs the model; AdamW runs eagerly (counted only on a GPU)"
        elif backend == "lazygraph":
            self.model = lazygraph.lazy_module(model)
            self.params = [p for p in model.parameters()]
        else:
            self.model = model
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.1)

    def run(self, args):
        idx, targets = args
        self.opt.zero_grad(set_to_none=True)
        _, loss = self.model(idx, targets)
        loss.backward()
        grads = [p.grad for p in self.params]
        self.opt.step()
        return [loss] + grads

    def finish(self, outputs):
        if self.backend == "lazygraph":
            lazygraph.sync()  # everything live: loss, grads, updated weights and AdamW state, as one graph
            return [lazygraph.to_eager(o).detach() for o in outputs]
        return [o.detach() for o in outputs]


# -- a Hugging Face GPT-2 with its own (eager) attention: the model nobody here wrote ---------------------


def _hf_gpt2_inputs(d, dtype, device, gen):
    ids = torch.randint(0, d["V"], (d["B"], d["T"]), generator=gen, device=device)
    mask = torch.ones(d["B"], d["T"], dtype=torch.long, device=device)
    mask[0, : d["T"] // 4] = 0  # left padding on one row: the padding mask reaches the attention
    return [ids, mask]


class HFGPT2TrainStep(Step):
    """transformers' GPT2LMHeadModel, attn_implementation="eager" (HF's own softmax(QK^T / s + mask) V),
    left-padded batch: zero_grad, loss, backward, AdamW. Compares the loss and the grads."""

    def __init__(self, backend: str, d: Dims, dtype: torch.dtype, device: torch.device):
        try:
            import transformers
        except ImportError as e:
            raise Unavailable("transformers is not installed (pip install transformers)") from e
        cfg = transformers.GPT2Config(vocab_size=d["V"], n_positions=d["T"], n_embd=d["C"], n_layer=d["L"],
                                      n_head=d["H"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation="eager")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            model = transformers.GPT2LMHeadModel(cfg).to(device=device, dtype=dtype)
        self.backend = backend
        self.params = list(model.parameters())
        self.n_compare = 1 + len(self.params)
        self.model = {"torch.compile": torch.compile, "lazygraph": lazygraph.compile}.get(backend, lambda m: m)(model)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.1)

    def run(self, args):
        ids, mask = args
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads = [p.grad for p in self.params]
        self.opt.step()
        return [loss] + grads


def _decode_inputs(d, dtype, device, gen):
    from .decode import decode_inputs  # decode.py imports this module

    return decode_inputs(d, dtype, device, gen)


def _decode_step(backend, d, dtype, device):
    from .decode import DecodeStep

    return DecodeStep(backend, d, dtype, device)


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("attn_scores", "softmax(scale * scores, causal mask), forward",
             {"small": dict(B=2, H=3, T=17), "large": dict(B=8, H=12, T=1024)},
             _attn_scores_inputs, fn=attn_scores),
    Workload("layernorm", "layer_norm(x, w, b), forward and backward",
             {"small": dict(N=37, C=48), "large": dict(N=8192, C=768)},
             _layernorm_inputs, fn=layernorm, grad_args=(0, 1, 2)),
    Workload("bias_gelu", "gelu_tanh(x + b), forward",
             {"small": dict(N=37, C=96), "large": dict(N=8192, C=3072)},
             _bias_gelu_inputs, fn=bias_gelu),
    Workload("cross_entropy", "cross_entropy(logits, targets), forward and backward",
             {"small": dict(N=29, V=67), "large": dict(N=8192, V=50257)},
             _cross_entropy_inputs, fn=cross_entropy, grad_args=(0,)),
    Workload("attn_block", "qkv linear, scores, causal mask, softmax, @v, proj; forward and backward",
             {"small": dict(B=2, T=17, C=32, H=4), "large": dict(B=8, T=1024, C=768, H=12)},
             _attn_block_inputs, make_step=_attn_block_step, grad_args=(0, 1, 2, 3, 4)),
    Workload("gpt2_step", "GPT-2 training step (forward, loss, backward, AdamW)",
             {"small": dict(B=2, T=16, L=2, C=32, H=2, V=64),
              "large": dict(B=8, T=1024, L=12, C=768, H=12, V=50257)},
             _gpt2_inputs, make_step=GPT2TrainStep),
    Workload("hf_gpt2_step", "transformers GPT-2, eager attention, padding mask: training step",
             {"small": dict(B=2, T=16, L=2, C=32, H=4, V=64),
              "large": dict(B=8, T=1024, L=12, C=768, H=12, V=50257)},
             _hf_gpt2_inputs, make_step=HFGPT2TrainStep),
    Workload("decode", "decode, tokens/s: GPT-2 with a static KV cache, one token per step (teacher-forced)",
             {"small": dict(B=1, T=16, L=2, C=64, H=4, V=256),
              "large": dict(B=1, T=256, L=12, C=768, H=12, V=50257)},
             _decode_inputs, make_step=_decode_step),
]}
