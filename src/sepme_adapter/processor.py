"""The attention processor that applies active erasers at run time (paper Eq. 10-11).

Every `attn2` gets a `SepMEAttnProcessor` that wraps whatever processor was installed
(default, sliced, xFormers, fused-projection, IP-Adapter, ...). When concepts are erased it
hands the wrapped processor a view of the attention module whose `to_k` / `to_v` return
`W x + sum_i beta_i * (x @ S_p,i) @ w_i.T`, so attention itself is never reimplemented and
PEFT LoRA layers on `to_k` / `to_v` keep working. `x @ S_p,i` is computed once per concept per
UNet call (every `attn2` reads the same text embeddings) and reused by every layer.

All state lives in one `ErasureRuntime` per UNet, a plain object: nothing leaks into
`unet.state_dict()` or `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .eraser import Eraser
from .errors import ErasureNotAppliedError
from .unet import cross_attention_modules

# A plan says which erasers apply to which batch rows: (adapter name, row indices or None = all).
Plan = tuple[tuple[str, "torch.Tensor | None"], ...]


class ErasureRuntime:
    """Loaded erasers of one UNet, which of them are active, and the per-call projection cache."""

    def __init__(self, unet: nn.Module, on_replaced: str = "reinstall") -> None:
        self.unet = unet
        self.attention = cross_attention_modules(unet)
        self.erasers: dict[str, Eraser] = {}
        self.trainable: set[str] = set()
        self.plan: Plan = ()
        self.fused = False
        self.on_replaced = on_replaced  # "reinstall" (warn) or "raise"
        # fuse_sepme: the original weights of the fused layers, and checksums of the fused ones
        self.fused_originals: dict[str, torch.Tensor] = {}
        self.fused_checksums: dict[str, tuple[float, float]] = {}
        self.base_fingerprint: dict[str, Any] | None = None  # of the original weights, computed once
        self._cast_cache: dict[tuple[str, str, torch.device, torch.dtype], torch.Tensor] = {}
        # A pipeline passes the same text tensor to every denoising step, so each layer's increment
        # is the same at every step: layer path -> (text tensor, its version, plan, increment).
        self._increments: dict[str, tuple[torch.Tensor, int, Plan, torch.Tensor | None]] = {}
        self._local = threading.local()
        self._hooks = [
            unet.register_forward_pre_hook(self._before_unet_call),
            unet.register_forward_hook(self._after_unet_call),
        ]
        for path, module in self.attention.items():
            install_processor(module, SepMEAttnProcessor(module.processor, self, path))

    # ------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Put back exactly the processors that were wrapped and drop the hooks."""
        for module in self.attention.values():
            processor = module.processor
            if isinstance(processor, SepMEAttnProcessor) and processor.runtime is self:
                uninstall_processor(module, processor)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._cast_cache.clear()
        self._increments = {}

    def add(self, adapter_name: str, eraser: Eraser, trainable: bool = False) -> None:
        """Register an eraser (inactive). `trainable` erasers are read live, so gradients reach `w`."""
        self.erasers[adapter_name] = eraser
        if trainable:
            self.trainable.add(adapter_name)
        self._drop_cache(adapter_name)

    def discard(self, adapter_name: str) -> None:
        self.erasers.pop(adapter_name, None)
        self.trainable.discard(adapter_name)
        self.plan = tuple(entry for entry in self.plan if entry[0] != adapter_name)
        self._drop_cache(adapter_name)

    def _drop_cache(self, adapter_name: str) -> None:
        self._increments = {}
        for key in [k for k in self._cast_cache if k[0] == adapter_name]:
            del self._cast_cache[key]

    # --------------------------------------------------------------- plans
    @property
    def active(self) -> list[str]:
        return [name for name, _ in self.plan]

    def set_active(self, names: Sequence[str]) -> None:
        """Exactly these erasers apply, to every batch row."""
        self.plan = tuple((name, None) for name in names)

    @contextlib.contextmanager
    def per_row(self, rows: Sequence[str | None]) -> Iterator[None]:
        """Within the block, batch row `r` gets eraser `rows[r]` (None: the original model).

        Training uses it to push every concept's pass through one batched UNet call.
        """
        plan = []
        for name in dict.fromkeys(r for r in rows if r is not None):
            index = torch.tensor([i for i, r in enumerate(rows) if r == name], dtype=torch.long)
            plan.append((name, index))
        previous, self.plan = self.plan, tuple(plan)
        try:
            yield
        finally:
            self.plan = previous

    def current_plan(self) -> Plan:
        """The plan snapshotted when this thread's UNet call began (so one call never mixes plans)."""
        snapshot = getattr(self._local, "plan", None)
        return self.plan if snapshot is None else snapshot

    # --------------------------------------------------------------- hooks
    def _before_unet_call(self, module: nn.Module, args: Any) -> None:
        self._local.plan = self.plan
        self._local.projections = {}
        if self.plan and not self.fused:
            self.verify_processors()

    def _after_unet_call(self, module: nn.Module, args: Any, output: Any) -> None:
        self._local.plan = None
        self._local.projections = {}

    def verify_processors(self) -> None:
        """Check every `attn2` still runs through this runtime; re-wrap or raise if diffusers replaced it.

        `enable_attention_slicing()`, xFormers enablement, `fuse_qkv_projections()`,
        `set_attn_processor()` and IP-Adapter loading all install new processors silently.
        """
        for path, module in self.attention.items():
            processor = module.processor
            if isinstance(processor, SepMEAttnProcessor) and processor.runtime is self:
                continue
            message = (f"the attention processor of {path} was replaced by {type(processor).__name__} "
                       f"while concepts {self.active} are erased")
            if self.on_replaced == "raise":
                raise ErasureNotAppliedError(message + "; call pipe.load_sepme / set_erased again after "
                                             "changing attention processors")
            warnings.warn(message + "; SepME re-installed its processor around the new one", stacklevel=4)
            install_processor(module, SepMEAttnProcessor(processor, self, path))

    # ---------------------------------------------------------------- math
    def layer_weight(self, name: str, layer_path: str, like: torch.Tensor) -> torch.Tensor | None:
        """`beta * w` of one layer in the activations' dtype and device (beta folded in: no fp16 overflow)."""
        eraser = self.erasers[name]
        w = eraser.weights.get(layer_path)
        if w is None:
            return None
        if name in self.trainable:
            return (eraser.beta * w).to(like.dtype)
        key = (name, layer_path, like.device, like.dtype)
        cached = self._cast_cache.get(key)
        if cached is None:
            cached = (eraser.beta * w.detach().float()).to(device=like.device, dtype=like.dtype)
            self._cast_cache[key] = cached
        return cached

    def basis(self, name: str, like: torch.Tensor) -> torch.Tensor:
        eraser = self.erasers[name]
        key = (name, "basis", like.device, like.dtype)
        cached = self._cast_cache.get(key)
        if cached is None:
            cached = eraser.basis.detach().to(device=like.device, dtype=like.dtype)
            self._cast_cache[key] = cached
        return cached

    def projection(self, name: str, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """`x @ S_p` for one eraser (its rows only), computed once per UNet call and text input."""
        if rows is not None:
            rows = rows.to(x.device)
        if self.erasers[name].basis is None:  # dense increment: the layer's own input
            return x if rows is None else x.index_select(0, rows)
        cache = getattr(self._local, "projections", None)
        if cache is None:
            cache = self._local.projections = {}
        hit = cache.get(name)
        if hit is not None and hit[0] is x:
            return hit[1]
        selected = x if rows is None else x.index_select(0, rows)
        projected = selected @ self.basis(name, x)
        cache[name] = (x, projected)  # holding x keeps its id from being reused during the call
        return projected

    def increment(self, x: torch.Tensor, layer_path: str) -> torch.Tensor | None:
        """`sum_i beta_i * (x @ S_p,i) @ w_i.T` over the active erasers that touch this layer (Eq. 11).

        Without gradients, the result is reused while the same, unmodified text tensor comes back
        under the same plan (every denoising step of one generation).
        """
        plan = self.current_plan()
        reuse = not torch.is_grad_enabled() and not self.trainable and not x.is_inference()
        if reuse:
            hit = self._increments.get(layer_path)
            if hit is not None and hit[0] is x and hit[1] == x._version and hit[2] is plan:
                return hit[3]
        total = self._compute_increment(x, layer_path, plan)
        if reuse:
            self._increments[layer_path] = (x, x._version, plan, total)
        return total

    def _compute_increment(self, x: torch.Tensor, layer_path: str, plan: Plan) -> torch.Tensor | None:
        total = None
        for name, rows in plan:
            w = self.layer_weight(name, layer_path, x)
            if w is None:
                continue
            delta = F.linear(self.projection(name, x, rows), w)
            if rows is not None:
                delta = torch.zeros(*x.shape[:-1], w.shape[0], dtype=delta.dtype, device=delta.device).index_add(
                    0, rows.to(x.device), delta
                )
            total = delta if total is None else total + delta
        return total

    def touches(self, layer_path: str) -> bool:
        return any(layer_path in self.erasers[name].weights for name, _ in self.current_plan())


WRAPPED_MODULE_KEY = "processor_wrapped_by_sepme"


def install_processor(module: nn.Module, wrapper: SepMEAttnProcessor) -> None:
    """Install a wrapper; a wrapped processor that is an `nn.Module` (IP-Adapter) stays registered.

    `Attention.set_processor` drops a module processor from the module tree when a plain object
    replaces it, which would take its weights out of `.to(device)`; we keep it registered under
    `WRAPPED_MODULE_KEY` while wrapped (its state-dict keys carry that name until unload).
    """
    module._modules.pop(WRAPPED_MODULE_KEY, None)
    inner = wrapper.inner
    module.set_processor(wrapper)
    if isinstance(inner, nn.Module):
        module._modules[WRAPPED_MODULE_KEY] = inner


def uninstall_processor(module: nn.Module, wrapper: SepMEAttnProcessor) -> None:
    """Put the wrapped processor back exactly as it was."""
    module._modules.pop(WRAPPED_MODULE_KEY, None)
    module.set_processor(wrapper.inner)


class _ErasingAttention:
    """A view of an `Attention` module whose projections add the active increments.

    Everything not overridden is read from the real module, so any processor that calls
    `attn.to_k(...)`, `attn.to_v(...)` or the fused `attn.to_kv(...)` applies the erasure.
    """

    def __init__(self, attn: nn.Module, runtime: ErasureRuntime, path: str) -> None:
        self.__dict__.update(_attn=attn, _runtime=runtime, _path=path, _used=set())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._attn, name, value)

    def _project(self, proj: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self._used.add(proj)
        out = module(x)
        delta = self._runtime.increment(x, f"{self._path}.{proj}")
        return out if delta is None else out + delta

    def to_k(self, x: torch.Tensor) -> torch.Tensor:
        return self._project("to_k", self._attn.to_k, x)

    def to_v(self, x: torch.Tensor) -> torch.Tensor:
        return self._project("to_v", self._attn.to_v, x)

    def to_q(self, x: torch.Tensor) -> torch.Tensor:
        return self._project("to_q", self._attn.to_q, x)

    def to_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Fused key/value projection (`fuse_qkv_projections()`): add `[delta_k, delta_v]`."""
        self._used.update(("to_k", "to_v"))
        out = self._attn.to_kv(x)
        deltas = [self._runtime.increment(x, f"{self._path}.{proj}") for proj in ("to_k", "to_v")]
        if all(d is None for d in deltas):
            return out
        half = out.shape[-1] // 2
        parts = [torch.zeros_like(out[..., :half]) if d is None else d for d in deltas]
        return out + torch.cat(parts, dim=-1)

    @property
    def to_out(self) -> Any:
        if not self._runtime.touches(f"{self._path}.to_out.0"):
            return self._attn.to_out
        view = self

        class _Out:
            def __getitem__(self, index: int) -> Any:
                if index == 0:
                    return lambda x: view._project("to_out.0", view._attn.to_out[0], x)
                return view._attn.to_out[index]

            def __len__(self) -> int:
                return len(view._attn.to_out)

        return _Out()


class SepMEAttnProcessor:
    """Wraps an `attn2` processor and adds the active erasers' increments to its projections.

    With nothing erased (or the increments fused into the weights) it calls the wrapped
    processor with the real module: outputs are bit-identical to the original model.
    """

    def __init__(self, inner: Any, runtime: ErasureRuntime, path: str) -> None:
        self.inner = inner
        self.runtime = runtime
        self.path = path

        # diffusers filters `cross_attention_kwargs` by the processor's signature: expose the inner one.
        def signature_carrier(*args: Any, **kwargs: Any) -> Any:
            return self(*args, **kwargs)

        signature_carrier.__signature__ = inspect.signature(inner.__call__)
        self.__dict__["__call__"] = signature_carrier

    def __call__(self, attn: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        runtime = self.runtime
        if runtime.fused or not runtime.current_plan():
            return self.inner(attn, *args, **kwargs)
        needed = {p for p in ("to_k", "to_v", "to_q", "to_out.0") if runtime.touches(f"{self.path}.{p}")}
        if not needed:
            return self.inner(attn, *args, **kwargs)
        view = _ErasingAttention(attn, runtime, self.path)
        output = self.inner(view, *args, **kwargs)
        missing = needed - view._used - {"to_out.0"}
        if missing:
            raise ErasureNotAppliedError(
                f"{type(self.inner).__name__} at {self.path} computed attention without calling "
                f"attn.{'/'.join(sorted(missing))}, so the erasure could not be applied; use a diffusers "
                f"attention processor (pipe.unet.set_default_attn_processor() before load_sepme)"
            )
        return output

    def __repr__(self) -> str:
        return f"SepMEAttnProcessor(inner={type(self.inner).__name__}, path={self.path!r})"
