"""The pipeline mixin: `load_sepme`, `set_erased`, `unload_sepme`, `fuse_sepme`.

Like diffusers' `IPAdapterMixin`, a pipeline gains the methods through `SepMELoaderMixin`
(or `attach(pipe)` on an existing instance). The loader walks the UNet, checks that each
eraser fits it (layer shapes, text width, base-model fingerprint), and keeps one
`ErasureRuntime` per UNet; toggling concepts only changes which erasers the processors read.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    FluxPipeline,
    ModelMixin,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from .eraser import Eraser
from .errors import BaseModelMismatchError, SepMEStateError
from .files import resolve_eraser_files
from .fingerprint import fingerprint, fingerprint_mismatch
from .mmdit import TEXT_LAYERS, TRANSFORMER_FAMILY, denoiser, family, is_transformer, layer_family
from .runtime import ErasureRuntime
from .unet import base_linear, layer_weight

RUNTIME_ATTRIBUTE = "_sepme_runtime"


def erasure_runtime(pipe: Any, create: bool = False) -> ErasureRuntime | None:
    """The `ErasureRuntime` of a pipeline's UNet or transformer (its loaded erasers and plans); `create` makes one."""
    model = denoiser(pipe)
    runtime = getattr(model, RUNTIME_ATTRIBUTE, None)
    if runtime is None and create:
        runtime = ErasureRuntime(model)
        setattr(model, RUNTIME_ATTRIBUTE, runtime)
        # one UNet-level override, so pipe.save_pretrained and pipe.unet.save_pretrained both say
        # what they save; a bound method, so copy.deepcopy binds the copy's to the copied UNet
        model.save_pretrained = types.MethodType(_save_pretrained_noting_erasure, model)
    return runtime


def _remove_runtime(unet: Any) -> None:
    runtime = getattr(unet, RUNTIME_ATTRIBUTE, None)
    if runtime is not None:
        runtime.remove()
        delattr(unet, RUNTIME_ATTRIBUTE)
    if getattr(vars(unet).get("save_pretrained"), "__func__", None) is _save_pretrained_noting_erasure:
        del unet.save_pretrained


class SepMEWarning(UserWarning):
    """Something works but without the guarantee the user may expect (e.g. approximate separation)."""


@functools.wraps(ModelMixin.save_pretrained)
def _save_pretrained_noting_erasure(self: Any, *args: Any, **kwargs: Any) -> Any:
    """`ModelMixin.save_pretrained`, warning when the saved weights are not what the pipeline generates with.

    Erasers apply at run time, so active ones are not in the saved weights; after `fuse_sepme` they are.
    """
    runtime = getattr(self, RUNTIME_ATTRIBUTE, None)
    if runtime is not None and runtime.active:
        if runtime.fused:
            warnings.warn(
                f"save_pretrained is saving weights with the erasure of {runtime.active} fused in (fuse_sepme): "
                f"the saved model has these concepts erased and is no longer the base model (erasers trained on "
                f"the base will need allow_base_mismatch=True to load onto it); call pipe.unfuse_sepme() first "
                f"to save the original weights", SepMEWarning, stacklevel=2)
        else:
            warnings.warn(
                f"save_pretrained is saving the original weights: the erasure of {runtime.active} is applied at "
                f"run time and is not saved, so the saved model generates these concepts; keep the eraser files "
                f"beside it (load_sepme after from_pretrained), or call pipe.fuse_sepme() first to save a model "
                f"with the concepts erased", SepMEWarning, stacklevel=2)
    return type(self).save_pretrained(self, *args, **kwargs)


class SepMELoaderMixin:
    """Gives a Stable Diffusion pipeline `load_sepme`, `set_erased`, `get_erased`, `list_sepme`,
    `unload_sepme`, `fuse_sepme` and `unfuse_sepme`."""

    # ------------------------------------------------------------ internals
    def _sepme_fingerprint(self, runtime: ErasureRuntime) -> dict[str, Any]:
        if runtime.base_fingerprint is None:
            runtime.base_fingerprint = fingerprint(self, runtime.fused_originals)
        return runtime.base_fingerprint

    def _check_fits(self, eraser: Eraser, runtime: ErasureRuntime, allow_base_mismatch: bool, source: str) -> None:
        """The model family and shapes always; the base-model fingerprint unless `allow_base_mismatch`."""
        model = denoiser(self)
        made_for, this = layer_family(eraser.weights), family(model)
        if made_for != this:
            kinds = {TRANSFORMER_FAMILY: "a FLUX / SD3 transformer (context_embedder)",
                     "unet": "a Stable Diffusion v1 / v2 / XL UNet (attn2)"}
            raise BaseModelMismatchError(
                f"{source}: eraser {eraser.name!r} was made for {kinds[made_for]} but {type(self).__name__} has "
                f"{kinds[this]}; load it onto a pipeline of its base model "
                f"({eraser.metadata.get('base_model', 'unknown')!r}), or train an eraser for this model")
        for layer_path, w in eraser.weights.items():
            try:
                linear = base_linear(model.get_submodule(layer_path))
            except AttributeError:
                raise BaseModelMismatchError(
                    f"{source}: layer {layer_path!r} does not exist in this UNet; the eraser was made for "
                    f"another architecture (base model {eraser.metadata.get('base_model', 'unknown')!r})"
                ) from None
            d_out, d_in = linear.weight.shape
            if eraser.down:  # rank r: B is d_out x r
                expected = (d_out, int(eraser.down[layer_path].shape[0]))
            elif eraser.separable:
                basis = eraser.basis_for(layer_path)
                expected = (d_out, basis.shape[1])
                if basis.shape[0] != d_in:
                    raise BaseModelMismatchError(
                        f"{source}: {layer_path} reads {d_in}-wide inputs but the eraser's basis for it is "
                        f"{basis.shape[0]} wide; the eraser was made for another model")
            else:
                expected = (d_out, d_in)
            if tuple(w.shape) != expected:
                raise BaseModelMismatchError(
                    f"{source}: {layer_path} has w of shape {tuple(w.shape)}, this UNet needs {expected}; "
                    f"the eraser was made for another model"
                )
            if eraser.separable and eraser.text_width != d_in and layer_path.endswith(TEXT_LAYERS):
                raise BaseModelMismatchError(
                    f"{source}: the eraser's basis is for {eraser.text_width}-wide text embeddings but "
                    f"{layer_path} reads {d_in}-wide ones (SD v1 is 768, SD v2 is 1024)"
                )
        stored = eraser.metadata.get("fingerprint")
        if stored is None:
            warnings.warn(
                f"{source}: eraser {eraser.name!r} has no base-model fingerprint (built in memory?), so it "
                f"cannot be checked against this pipeline's base model", SepMEWarning, stacklevel=4,
            )
            return
        problem = fingerprint_mismatch(stored, self._sepme_fingerprint(runtime))
        if problem is None:
            return
        message = (f"{source}: eraser {eraser.name!r} was trained on base model "
                   f"{eraser.metadata.get('base_model', 'unknown')!r}, not this pipeline's: {problem}")
        if not allow_base_mismatch:
            raise BaseModelMismatchError(message + ". Load it onto its own base model, or pass "
                                         "allow_base_mismatch=True to use it anyway (erasure may be weaker).")
        warnings.warn(message + " (loaded anyway: allow_base_mismatch=True)", SepMEWarning, stacklevel=4)

    # ------------------------------------------------------------------ API
    def load_sepme(
        self,
        source: str | os.PathLike | Eraser,
        weight_name: str | None = None,
        subfolder: str | None = None,
        adapter_name: str | None = None,
        erase: bool = True,
        *,
        allow_base_mismatch: bool = False,
        **hub_kwargs: Any,
    ) -> str | list[str]:
        """Load one eraser (or every eraser of a folder / Hub repo) and, by default, erase its concept.

        Args:
            source: a `.safetensors` path, a folder, a Hub repo id, or an in-memory `Eraser`.
            weight_name: the file inside the folder or repo (default: every `.safetensors` file).
            subfolder: a folder inside `source`.
            adapter_name: the name to toggle it by (default: the concept name stored in the file).
            erase: also erase the concept now (`False`: loaded but restored).
            allow_base_mismatch: load even if the eraser was trained on another base model.
            **hub_kwargs: `revision`, `cache_dir`, `token`, `local_files_only` for Hub downloads.

        Returns:
            The adapter name when `source` is a file, an `Eraser` or `weight_name` picks one file; a list
            of names when `source` is a folder or a Hub repo without `weight_name`, even if it holds a
            single eraser (so `pipe.load_sepme(folder)` always returns a list).

        Example:
            >>> pipe = sepme_adapter.attach(StableDiffusionPipeline.from_pretrained(MODEL))
            >>> pipe.load_sepme("vangogh.safetensors")
            'vangogh'
            >>> pipe.load_sepme("someone/sd15-erasers", weight_name="picasso.safetensors")
            'picasso'
        """
        runtime = erasure_runtime(self)
        if runtime is not None and runtime.fused and erase:
            raise SepMEStateError("erasers are fused into the weights; call pipe.unfuse_sepme() before "
                                  "loading with erase=True (or load with erase=False)")
        if isinstance(source, Eraser):
            loaded = [(source, "in-memory eraser")]
        else:
            loaded = [(Eraser.load(p), str(p)) for p in resolve_eraser_files(source, weight_name, subfolder,
                                                                          **hub_kwargs)]
        if adapter_name is not None and len(loaded) > 1:
            raise ValueError(f"adapter_name={adapter_name!r} names one eraser but {len(loaded)} were found; "
                             f"pass weight_name to pick one")
        names = [adapter_name or eraser.name for eraser, _ in loaded]
        existing = set(runtime.erasers) if runtime is not None else set()
        for name in names:
            if name in existing or names.count(name) > 1:
                raise ValueError(f"an eraser named {name!r} is already loaded; pass adapter_name=... to load "
                                 f"another one, or pipe.unload_sepme([{name!r}]) first")
        created = runtime is None
        runtime = erasure_runtime(self, create=True)
        try:
            for eraser, where in loaded:
                self._check_fits(eraser, runtime, allow_base_mismatch, where)
        except BaseException:
            if created and not runtime.erasers:
                self.unload_sepme()
            raise
        for (eraser, _), name in zip(loaded, names):
            runtime.add(name, eraser)
        if erase:
            self.set_erased([*runtime.active, *names])
        single = isinstance(source, Eraser) or weight_name is not None or Path(source).is_file()
        return names[0] if single else names

    def set_erased(self, names: Iterable[str]) -> None:
        """Erase exactly these loaded concepts; every other loaded concept is restored.

        `set_erased([])` gives the original model, bit for bit. Cheap: no weights are copied.

        Example:
            >>> pipe.set_erased(["picasso", "cezanne"])
            >>> pipe.set_erased([])
        """
        if isinstance(names, (str, bytes)):
            raise TypeError(f"set_erased takes a list of names, got the string {names!r}; "
                            f"did you mean set_erased([{names!r}])?")
        if names is None:
            raise TypeError("set_erased takes a list of names, got None; pipe.set_erased([]) restores the original "
                            "model, pipe.set_erased(pipe.list_sepme()) erases every loaded concept")
        try:
            names = list(names)
        except TypeError:
            raise TypeError(f"set_erased takes a list of names, got {type(names).__name__} {names!r}") from None
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"set_erased takes a list of names (strings), got {names!r}")
        runtime = erasure_runtime(self)
        loaded = list(runtime.erasers) if runtime is not None else []
        unknown = [n for n in names if n not in loaded]
        if unknown:
            raise KeyError(f"no eraser named {unknown} is loaded; loaded: {loaded}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"set_erased got {duplicates} more than once")
        if runtime is None:
            return
        if runtime.fused:
            raise SepMEStateError("erasers are fused into the weights; call pipe.unfuse_sepme() before set_erased")
        self._warn_inseparable(runtime, names)
        runtime.set_active(names)

    def _warn_inseparable(self, runtime: ErasureRuntime, names: list[str]) -> None:
        erasers = {n: runtime.erasers[n] for n in names}
        weak = [
            (a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if not erasers[a].is_separable_from(erasers[b])
        ]
        restored = [n for n in runtime.erasers if n not in erasers]
        leaking = [(a, r) for a in names for r in restored
                   if not all(erasers[a].excludes_prompt(p) for p in runtime.erasers[r].prompts)]
        if weak or leaking:
            details = [f"{a} + {b} (not trained knowing each other)" for a, b in weak]
            details += [f"{a} touches restored {r!r}'s prompts beyond its leakage certificate" for a, r in leaking]
            warnings.warn("this combination has no exact separation guarantee: " + "; ".join(details),
                          SepMEWarning, stacklevel=3)

    def get_erased(self) -> list[str]:
        """The names of the erased concepts, in the order they were set."""
        runtime = erasure_runtime(self)
        return [] if runtime is None else list(runtime.active)

    def list_sepme(self) -> dict[str, dict[str, Any]]:
        """Every loaded eraser: its prompts, known concepts, protected prompts, basis, rank (None: full), leakage certificate
        (the largest relative K/V change it causes on the prompts it keeps; None if never measured), whether it
        has SDXL's pooled increment, and state."""
        runtime = erasure_runtime(self)
        if runtime is None:
            return {}
        return {
            name: {
                "concept": e.name, "prompt": e.prompt, "prompts": list(e.prompts), "known": dict(e.known),
                "protected": list(e.protected), "separable": e.separable, "erased": name in runtime.active,
                "beta": e.beta, "rank": e.rank, "base_model": e.metadata.get("base_model"),
                "basis": e.metadata.get("basis"), "certificate": e.certificate, "pooled": e.has_pooled,
                "collateral": {k: v for k, v in (e.metadata.get("collateral") or {}).items() if k != "held_out"}
                or None,
            }
            for name, e in runtime.erasers.items()
        }

    def unload_sepme(self, names: Iterable[str] | None = None) -> None:
        """Remove erasers (default: all). With none left, the UNet carries no trace of SepME (no hooks)."""
        runtime = erasure_runtime(self)
        if runtime is None:
            if names:
                raise KeyError(f"no eraser named {list(names)} is loaded; loaded: []")
            _remove_runtime(denoiser(self))  # a left-over save_pretrained override, if any
            return
        if runtime.fused:
            raise SepMEStateError("erasers are fused into the weights; call pipe.unfuse_sepme() before unloading")
        if isinstance(names, (str, bytes)):
            raise TypeError(f"unload_sepme takes a list of names, got the string {names!r}")
        names = list(runtime.erasers) if names is None else list(names)
        unknown = [n for n in names if n not in runtime.erasers]
        if unknown:
            raise KeyError(f"no eraser named {unknown} is loaded; loaded: {list(runtime.erasers)}")
        for name in names:
            runtime.discard(name)
        if not runtime.erasers:
            _remove_runtime(denoiser(self))

    @torch.no_grad()
    def fuse_sepme(self) -> None:
        """Bake the active increments into `to_k` / `to_v` (zero run-time overhead); undo with `unfuse_sepme`.

        The original weights are kept (one copy of each changed layer) so unfusing is exact.

        Example:
            >>> pipe.set_erased(["vangogh"]); pipe.fuse_sepme(); image = pipe(prompt).images[0]
            >>> pipe.unfuse_sepme()
        """
        runtime = erasure_runtime(self)
        if runtime is None or not runtime.active:
            raise SepMEStateError("nothing is erased, so there is nothing to fuse; load_sepme / set_erased first")
        if runtime.fused:
            raise SepMEStateError("erasers are already fused; call pipe.unfuse_sepme() first")
        self._refuse_fused_projections(runtime, "fuse_sepme")
        self._sepme_fingerprint(runtime)  # of the original weights, before they change
        totals: dict[str, torch.Tensor] = {}
        for name in runtime.active:
            eraser = runtime.erasers[name]
            for layer_path in eraser.weights:
                delta = eraser.delta(layer_path)
                totals[layer_path] = delta if layer_path not in totals else totals[layer_path] + delta
        originals = {}
        for layer_path, delta in totals.items():
            weight = layer_weight(denoiser(self), layer_path)
            originals[layer_path] = weight.detach().clone()
            wide = torch.promote_types(weight.dtype, torch.float32)  # float32, float64 for a float64 model
            weight.copy_((weight.to(wide) + delta.to(weight.device, wide)).to(weight.dtype))
        runtime.fused_originals = originals
        runtime.fused_checksums = {p: _checksum(layer_weight(denoiser(self), p)) for p in totals}
        runtime.fused_names = list(runtime.active)
        runtime.fused = True

    def _refuse_fused_projections(self, runtime: ErasureRuntime, action: str) -> None:
        """`fuse_qkv_projections()` copies to_k / to_v into `to_kv`, which would not follow the fused weights."""
        if any(type(m.processor).__name__.startswith("Fused") for m in runtime.attention.values()):
            raise SepMEStateError(f"{action} cannot run while attention projections are fused; call "
                                  f"pipe.unfuse_qkv_projections() first (fuse_qkv_projections only after fuse_sepme "
                                  f"keeps the erasure, but then unfuse them before unfuse_sepme)")

    @torch.no_grad()
    def unfuse_sepme(self) -> None:
        """Take the fused increments out of the weights again; erasers apply at run time again.

        Layers unchanged since `fuse_sepme` get back the exact copy it saved. Layers changed in between
        (e.g. `fuse_lora` / `unfuse_lora` after `fuse_sepme`, or `fuse_lora -> fuse_sepme -> unfuse_lora`)
        get the fused increments subtracted instead, with a `SepMEWarning`: that keeps the other change
        and is exact up to float round-off when the change was additive, as LoRA fusing is.
        """
        runtime = erasure_runtime(self)
        if runtime is None or not runtime.fused:
            raise SepMEStateError("nothing is fused; call pipe.fuse_sepme() first")
        self._refuse_fused_projections(runtime, "unfuse_sepme")
        changed = [p for p, checksum in runtime.fused_checksums.items()
                   if _checksum(layer_weight(denoiser(self), p)) != checksum]
        if changed:
            warnings.warn(
                f"{len(changed)} fused layers changed since fuse_sepme (e.g. {changed[0]}, by fuse_lora / "
                f"unfuse_lora?), so unfuse_sepme subtracted the increments of {runtime.fused_names} from them "
                f"instead of restoring its saved copy: exact up to float round-off if the change in between "
                f"was additive (LoRA fusing is); unfuse in the reverse order of fusing for bit-exact weights",
                SepMEWarning, stacklevel=3)
        for layer_path, original in runtime.fused_originals.items():
            weight = layer_weight(denoiser(self), layer_path)
            if layer_path not in changed:
                weight.copy_(original)
                continue
            delta = sum(runtime.erasers[n].delta(layer_path) for n in runtime.fused_names
                        if layer_path in runtime.erasers[n].weights)
            wide = torch.promote_types(weight.dtype, torch.float32)
            weight.copy_((weight.to(wide) - delta.to(weight.device, wide)).to(weight.dtype))
        runtime.fused_originals = {}
        runtime.fused_checksums = {}
        runtime.fused_names = []
        runtime.fused = False


def _checksum(weight: torch.Tensor) -> tuple[float, float]:
    """A cheap fingerprint of a weight, to notice changes made between fusing and unfusing."""
    return float(weight.double().sum()), float(weight.double().abs().sum())


_MIXIN_METHODS = [
    name for name, value in vars(SepMELoaderMixin).items()
    if callable(value) and not name.startswith("__")
]


def attach(pipe: Any) -> Any:
    """Bind the SepME methods to an existing pipeline instance and return the same object.

    Works for any pipeline with a `UNet2DConditionModel` (`unet`), CLIP text encoder(s) and `encode_prompt`:
    StableDiffusion, Img2Img and Inpaint of SD v1 and v2, and StableDiffusionXL, XL Img2Img and XL Inpaint
    (and what `AutoPipelineFor*` returns for them); and `FluxPipeline` / `StableDiffusion3Pipeline` (a
    transformer whose text enters through `context_embedder`, see `mmdit.py`). Nothing is patched globally.

    Example:
        >>> pipe = sepme_adapter.attach(StableDiffusionPipeline.from_pretrained(MODEL))
    """
    has_encoder = any(getattr(pipe, a, None) is not None for a in ("text_encoder", "text_encoder_2"))
    has_tokenizer = any(getattr(pipe, a, None) is not None for a in ("tokenizer", "tokenizer_2"))
    transformer = getattr(pipe, "transformer", None)
    missing = [a for a in ("encode_prompt",) if getattr(pipe, a, None) is None]
    missing += [] if getattr(pipe, "unet", None) is not None or transformer is not None else ["unet"]
    missing += [] if has_encoder else ["text_encoder"]
    missing += [] if has_tokenizer else ["tokenizer"]
    if missing:
        raise TypeError(f"{type(pipe).__name__} lacks {missing}; SepME needs a Stable Diffusion (v1, v2 or XL) "
                        f"pipeline (UNet2DConditionModel + CLIP text encoder), or an SD3 or FLUX pipeline")
    if transformer is not None and not is_transformer(transformer):
        raise TypeError(f"{type(pipe).__name__}'s {type(transformer).__name__} has no `context_embedder` (the layer "
                        f"the text enters in FLUX and SD3); SepME supports FluxTransformer2DModel and "
                        f"SD3Transformer2DModel among transformers")
    if isinstance(pipe, SepMELoaderMixin):
        return pipe
    for name in _MIXIN_METHODS:
        object.__setattr__(pipe, name, types.MethodType(getattr(SepMELoaderMixin, name), pipe))
    return pipe


class SepMEStableDiffusionPipeline(SepMELoaderMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` with the SepME methods.

    Example:
        >>> pipe = SepMEStableDiffusionPipeline.from_pretrained(MODEL)
        >>> pipe.load_sepme("vangogh.safetensors")
    """


class SepMEStableDiffusionXLPipeline(SepMELoaderMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` with the SepME methods.

    Example:
        >>> pipe = SepMEStableDiffusionXLPipeline.from_pretrained(SDXL_MODEL)
        >>> pipe.load_sepme("vangogh.safetensors")
    """


class SepMEFluxPipeline(SepMELoaderMixin, FluxPipeline):
    """`FluxPipeline` with the SepME methods (the increments live on `context_embedder` and the pooled layer).

    Example:
        >>> pipe = SepMEFluxPipeline.from_pretrained(FLUX_MODEL)
        >>> pipe.load_sepme("vangogh.safetensors")
    """


class SepMEStableDiffusion3Pipeline(SepMELoaderMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` with the SepME methods (the increments live on `context_embedder` and the
    pooled layer).

    Example:
        >>> pipe = SepMEStableDiffusion3Pipeline.from_pretrained(SD3_MODEL)
        >>> pipe.load_sepme("vangogh.safetensors")
    """


__all__ = ["SepMEFluxPipeline", "SepMELoaderMixin", "SepMEStableDiffusion3Pipeline", "SepMEStableDiffusionPipeline",
           "SepMEStableDiffusionXLPipeline", "SepMEWarning", "attach", "erasure_runtime"]
