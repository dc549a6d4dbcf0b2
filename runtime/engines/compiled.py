"""The ``compiled`` backend: one ahead-of-time compiled function per (model, batch bucket).

``make engines`` compiles each (model, bucket) with ``torch.compile(call_module,
fullgraph=True).aot_compile(...)`` (Dynamo trace + Inductor, static shapes) and saves it with
``save_compiled_function``; the manifest maps model -> bucket -> file, its sha256, size and
the input shapes, dtypes and device the function was compiled for.  At start-up
``torch.compiler.load_compiled_function`` reads a file back: no Dynamo trace, no Inductor
lowering.  H200, fp16, full-size MuseTalk, batch 16, torch 2.11: the UNet loads in 3.4 s
(+ 3.1 s first call), where re-running ``torch.compile`` against saved Inductor caches took
~22 s; the VAE decoder loads in 0.16 s (+ 1.5 s first call).

The module is an argument of the compiled function, not baked into it: its parameters are read
at every call, so the run-time module must be the one compiled, structurally.  The graph
rewrites recorded in the manifest are therefore applied again before loading.

Guards are off (``torch.compiler.skip_all_guards_unsafe``): on torch 2.11 the default guards do
not serialise (ID_MATCH on the module) and tensor-only guards reject inference tensors
(dispatch-key mismatch).  A loaded function would thus run on any input; instead
``CompiledEngine`` refuses to use one unless its own buffers have exactly the recorded shapes,
dtypes and device (buffers are fixed per engine, ``_args(rows)`` slices them).

No Inductor freezing: ``aot_compile`` does not support it (torch 2.11: "expected OutputCode,
got function").  H200, fp16, CUDA graphs, batch 16: UNet 0.64 ms/frame without freezing
against 0.57 ms with it; start-up in seconds is worth the 12%.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from talkrt.config import TalkrtConfig
from talkrt.engines.base import TensorSpec
from talkrt.engines.graphs import BucketedEngine, _as_tuple, check_warmup_policy
from talkrt.engines.manifest import (
    check_manifest, config_dir, dtype_name, machine_info, read_manifest, rebuild_hint,
)
from talkrt.errors import EngineError
from talkrt.hashing import sha256_files
from talkrt.models.subpixel import REWRITE_NAME, rewrite_upsamplers

log = logging.getLogger(__name__)

# Inductor's default mode, not max-autotune: on an H200 (fp16, 2026-11-22) autotuning chose
# cuDNN over its Triton templates for the VAE decoder's large convolutions anyway, and did not
# finish one VAE bucket in 100 s.  `make engines COMPILE_MODE=max-autotune-no-cudagraphs` still selects it.
DEFAULT_COMPILE_MODE = "default"
# Graph rewrites applied to a module before it is compiled (recorded in the manifest, applied
# again at load: the call-time module must be the compiled one).  subpixel_upsample
# (talkrt.models.subpixel): nearest-2x + 3x3 conv as one stride-2 transposed conv.  H100, fp16,
# CUDA graphs, 2026-11-22: VAE decoder 50.2 -> 46.5 ms at batch 32, 6.87 -> 6.39 ms at batch 4;
# max |diff| against eager fp16 (0-255 scale) 1.25 with and without it.
GRAPH_REWRITES = {REWRITE_NAME: rewrite_upsamplers}
DEFAULT_REWRITES = (REWRITE_NAME,)
MANIFEST_FILE = "manifest.json"
ARTIFACT_FORMAT = "aot_compile"      # what the files are; builds of any other format are refused


def compiled_dir(cfg: TalkrtConfig, device: torch.device | str, dtype: torch.dtype,
                 engines_dir: str | Path | None = None) -> Path:
    return config_dir(cfg, engines_dir) / "compiled" / f"{torch.device(device).type}-{dtype_name(dtype)}"


def expected_manifest(cfg: TalkrtConfig, device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    """Manifest fields that must match for saved functions to be usable here."""
    return {"kind": "compiled", "format": ARTIFACT_FORMAT, "torch_version": torch.__version__,
            **machine_info(device), "dtype": dtype_name(dtype), "config_hash": cfg.model_hash()}


@dataclass(frozen=True)
class CompileSettings:
    """How the ``compiled`` backend compiles a module; stored in (and read back from) the manifest."""

    mode: str = DEFAULT_COMPILE_MODE
    rewrites: tuple[str, ...] = DEFAULT_REWRITES

    def __post_init__(self) -> None:
        unknown = [r for r in self.rewrites if r not in GRAPH_REWRITES]
        if unknown:
            raise EngineError(f"unknown graph rewrite(s) {unknown}; known: {sorted(GRAPH_REWRITES)}")

    def manifest_fields(self) -> dict[str, Any]:
        return {"compile_mode": self.mode, "rewrites": list(self.rewrites)}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "CompileSettings":
        """Settings of a saved build; ``KeyError`` if the manifest lacks them."""
        return cls(manifest["compile_mode"], tuple(manifest["rewrites"]))

    def describe(self) -> str:
        return f"mode {self.mode}, rewrites {list(self.rewrites) or 'none'}"


def add_compile_arguments(parser) -> None:
    """The ``--compile-mode / --rewrites`` options of the CLIs that compile."""
    parser.add_argument("--compile-mode", default=DEFAULT_COMPILE_MODE, help="torch.compile mode for 'compiled'")
    parser.add_argument("--rewrites", default=",".join(DEFAULT_REWRITES),
                        help=f"comma list of graph rewrites before compiling, or 'none' (known: "
                             f"{','.join(GRAPH_REWRITES)}; default: %(default)s)")


def settings_from_args(args) -> CompileSettings:
    """``CompileSettings`` from the options ``add_compile_arguments`` added."""
    names = [] if args.rewrites.strip().lower() == "none" else args.rewrites.split(",")
    return CompileSettings(args.compile_mode, tuple(n.strip() for n in names if n.strip()))


def apply_rewrites(module: torch.nn.Module, rewrites: Sequence[str], name: str = "module") -> torch.nn.Module:
    """``module`` with ``rewrites`` applied in order (the original is left unchanged)."""
    for rewrite in rewrites:
        module, count = GRAPH_REWRITES[rewrite](module)
        log.info("%s: rewrite %s applied to %d layer(s)", name, rewrite, count)
    return module


def input_specs(args: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """Shape, dtype and device of each tensor: what a compiled function may be called with."""
    return [{"shape": list(t.shape), "dtype": dtype_name(t.dtype), "device": str(t.device)} for t in args]


def call_module(module: torch.nn.Module, *args: torch.Tensor):
    """What is compiled: the module is an input, so its parameters are read at every call."""
    return module(*args)


def _enable_aot_compile() -> None:
    config = torch._dynamo.config
    if hasattr(config, "enable_aot_compile"):        # torch 2.11 needs it on; later versions default to on
        config.enable_aot_compile = True


def compile_function(module: torch.nn.Module, args: Sequence[torch.Tensor], settings: CompileSettings):
    """``call_module`` compiled ahead of time for exactly ``args`` (static shapes, no guards).

    Returns a ``torch._dynamo.aot_compile.AOTCompiledFunction``: call it as ``fn(module, *args)``,
    save it with ``fn.save_compiled_function(path)``.  ``args`` should be inference tensors, as
    the engine's buffers are.
    """
    from torch._inductor import list_mode_options
    _enable_aot_compile()
    # dynamic=False: static shapes even where Dynamo's automatic-dynamic profile saw other buckets
    options = {**list_mode_options(settings.mode), "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
    compiled = torch.compile(call_module, fullgraph=True, dynamic=False, options=options)
    with torch.inference_mode():
        return compiled.aot_compile(((module, *args), {}))


@dataclass(frozen=True)
class CompiledBuild:
    """A checked compiled build: its folder, compile settings, per model the buckets to run."""

    folder: Path
    settings: CompileSettings
    buckets: dict[str, tuple[int, ...]]
    manifest: dict[str, Any]
    cfg_name: str | None = None

    def entry(self, name: str, bucket: int) -> dict[str, Any]:
        """The manifest entry of (``name``, ``bucket``); ``EngineError`` if the build lacks it."""
        entry = self.manifest.get("entries", {}).get(name, {}).get(str(bucket))
        if entry is None:
            raise EngineError(f"compiled engines at {self.folder}: no '{name}' function for batch {bucket}; "
                              f"{rebuild_hint(self.cfg_name)}")
        return entry


def usable_buckets(built: Sequence[int], max_batch: int | None) -> tuple[int, ...] | None:
    """Built buckets up to the smallest one holding ``max_batch`` (all when None); None if none does."""
    built = sorted(built)
    if max_batch is None:
        return tuple(built) or None
    cover = next((b for b in built if b >= max_batch), None)
    return None if cover is None else tuple(b for b in built if b <= cover)


def _other_model_hashes(cfg: TalkrtConfig, folder: Path) -> str:
    """A sentence naming builds of the same config name for another model hash (a changed config), or ''."""
    sub, root = folder.relative_to(folder.parents[1]), folder.parents[2]    # compiled/<device>-<dtype>, engines root
    others = sorted(p.parents[2].name for p in root.glob(f"{cfg.name}-*/{sub}/{MANIFEST_FILE}") if p.parent != folder)
    if not others:
        return ""
    return (f" (found builds of config '{cfg.name}' for other model hashes: {', '.join(others)}; this config's "
            f"model section hashes to {cfg.model_hash()}, so a field of it changed since they were built)")


def open_compiled_build(cfg: TalkrtConfig, *, device: torch.device | str, dtype: torch.dtype,
                        models: Sequence[str], max_batch: int | Mapping[str, int] | None,
                        engines_dir: str | Path | None = None) -> CompiledBuild:
    """Check the saved manifest and files for ``models``; return what to run (nothing is loaded yet).

    ``max_batch``: the largest batch each model must run (one int for all, or per model name;
    None: every built bucket).  Raises ``EngineError`` (saying to run ``make engines``) if the
    build is missing (naming builds for another model hash of the same config name: a changed
    config), was made for another format / torch / GPU / dtype / config, has no bucket holding
    ``max_batch``, or a file it lists is missing or of the wrong size.  Contents (sha256) are
    checked as each file is loaded.
    """
    folder = compiled_dir(cfg, device, dtype, engines_dir)
    if not (folder / MANIFEST_FILE).is_file():
        raise EngineError(f"compiled engines: no manifest at {folder / MANIFEST_FILE}"
                          f"{_other_model_hashes(cfg, folder)}; {rebuild_hint(cfg.source)}")
    manifest = read_manifest(folder / MANIFEST_FILE, "compiled engines", cfg.source)
    check_manifest(manifest, expected_manifest(cfg, device, dtype), what="compiled engines",
                   path=folder, cfg_name=cfg.source)
    try:
        settings = CompileSettings.from_manifest(manifest)
    except (KeyError, TypeError) as exc:
        raise EngineError(f"compiled engines at {folder}: manifest lacks compile settings ({exc}); "
                          f"{rebuild_hint(cfg.source)}") from exc
    build = CompiledBuild(folder, settings, {}, manifest, cfg.source)
    for name in models:
        built = [int(b) for b in manifest.get("entries", {}).get(name, {})]
        need = max_batch.get(name) if isinstance(max_batch, Mapping) else max_batch
        usable = usable_buckets(built, need)
        if usable is None:
            raise EngineError(f"compiled engines at {folder}: '{name}' has no build for batch {need} "
                              f"(built: {sorted(built)}); {rebuild_hint(cfg.source)}"
                              f"{'' if isinstance(max_batch, Mapping) else f' with --max-batch {need}'}")
        build.buckets[name] = usable
        for bucket in usable:
            entry = build.entry(name, bucket)
            path = folder / entry["file"]
            if not path.is_file():
                raise EngineError(f"compiled engines: {path} ('{name}' batch {bucket}) is missing; "
                                  f"{rebuild_hint(cfg.source)}")
            if path.stat().st_size != entry["bytes"]:
                raise EngineError(f"compiled engines: {path} has {path.stat().st_size} bytes, its manifest says "
                                  f"{entry['bytes']} (corrupt or partly written); {rebuild_hint(cfg.source)}")
    return build


def load_function(path: Path, expected_sha: str, cfg_name: str | None = None) -> Callable[..., Any]:
    """Load one saved compiled function after checking its sha256; ``EngineError`` on any failure."""
    try:
        digest = sha256_files([path])
    except OSError as exc:
        raise EngineError(f"compiled engines: cannot read {path} ({exc}); {rebuild_hint(cfg_name)}") from exc
    if digest != expected_sha:
        raise EngineError(f"compiled engines: {path} does not match its manifest's sha256 (corrupt or replaced); "
                          f"{rebuild_hint(cfg_name)}")
    try:
        _enable_aot_compile()
        return torch.compiler.load_compiled_function(io.BytesIO(path.read_bytes()))
    except Exception as exc:  # noqa: BLE001 - unpickling and torch's compatibility checks fail in many ways
        raise EngineError(f"compiled engines: torch could not load {path} ({type(exc).__name__}: {exc}); "
                          f"{rebuild_hint(cfg_name)}") from exc


class CompiledEngine(BucketedEngine):
    """An ahead-of-time compiled module at fixed batch buckets (pads a smaller batch up to its bucket).

    With ``build`` (from :func:`open_compiled_build`) each bucket's function is loaded from its
    file when the bucket is prepared; without, it is compiled here with ``settings`` (what the
    build step and benchmarks do; ``compile_seconds`` records how long).  The module (eval mode,
    no gradients) gets the settings' rewrites before anything is compiled or loaded.  Raises
    ``EngineError`` when a bucket is not in ``build`` or the build's recorded inputs differ
    from this engine's buffers (shape, dtype or device).  ``warmup``: see ``WARMUP_POLICIES``.
    """

    backend = "compiled"

    def __init__(self, name: str, module: torch.nn.Module, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], buckets: Sequence[int], *, device: torch.device | str,
                 dtype: torch.dtype, build: CompiledBuild | None = None, settings: CompileSettings | None = None,
                 functions: Mapping[int, Callable[..., Any]] | None = None, cuda_graphs: bool = False,
                 warmup: str = "all", graph_fallback: bool = False):
        if build is not None and settings is not None and settings != build.settings:
            raise EngineError(f"engine '{name}': settings {settings.describe()} differ from the build's "
                              f"({build.settings.describe()})")
        check_warmup_policy(warmup)                     # an unknown policy fails before any work
        self.build = build
        self.settings = build.settings if build is not None else settings or CompileSettings()
        module.eval().requires_grad_(False)
        self.module = apply_rewrites(module, self.settings.rewrites, name).eval().requires_grad_(False)
        self.dtype = dtype
        self._functions: dict[int, Callable[..., Any]] = dict(functions or {})
        self.bucket_load_seconds: dict[int, float] = {}
        self.compile_seconds: dict[int, float] = {}
        super().__init__(name, inputs, outputs, buckets, device=device, input_dtypes={s.name: dtype for s in inputs},
                         cuda_graphs=cuda_graphs, graph_fallback=graph_fallback)
        if build is not None:
            for bucket in self.buckets:
                self._check_inputs_recorded(bucket)
        self.warm_up(warmup)

    def input_specs(self, bucket: int) -> list[dict[str, Any]]:
        """What this engine calls the ``bucket`` function with (the manifest's ``inputs``)."""
        return input_specs(self._args(bucket))

    def _check_inputs_recorded(self, bucket: int) -> None:
        recorded, ours = self.build.entry(self.name, bucket).get("inputs"), self.input_specs(bucket)
        if recorded != ours:
            raise EngineError(f"compiled engines at {self.build.folder}: '{self.name}' batch {bucket} was compiled "
                              f"for inputs {recorded}, this engine calls it with {ours}; "
                              f"{rebuild_hint(self.build.cfg_name)}")

    @property
    def functions(self) -> dict[int, Callable[..., Any]]:
        """Bucket -> compiled function, for those loaded or compiled so far."""
        return dict(self._functions)

    def function(self, bucket: int) -> Callable[..., Any]:
        """The compiled function of ``bucket``, loaded or compiled on first request."""
        if bucket not in self._functions:
            if bucket not in self.buckets:
                raise EngineError(f"engine '{self.name}' has no batch bucket {bucket} "
                                  f"(buckets: {list(self.buckets)})")
            start = time.perf_counter()
            if self.build is None:
                self._functions[bucket] = compile_function(self.module, self._args(bucket), self.settings)
                self.compile_seconds[bucket] = time.perf_counter() - start
                log.info("compiled engine %s: batch %d compiled in %.1f s", self.name, bucket,
                         self.compile_seconds[bucket])
            else:
                entry = self.build.entry(self.name, bucket)
                self._functions[bucket] = load_function(self.build.folder / entry["file"], entry["sha256"],
                                                        self.build.cfg_name)
                self.bucket_load_seconds[bucket] = time.perf_counter() - start
                self.load_seconds = sum(self.bucket_load_seconds.values())
                log.info("compiled engine %s: batch %d loaded from %s in %.2f s", self.name, bucket, entry["file"],
                         self.bucket_load_seconds[bucket])
        return self._functions[bucket]

    def prepare(self, bucket: int) -> None:
        self.function(bucket)           # load / compile outside the warm-up timing
        super().prepare(bucket)

    def _launch(self, rows: int) -> tuple[torch.Tensor, ...]:
        return _as_tuple(self._functions[rows](self.module, *self._args(rows)))
