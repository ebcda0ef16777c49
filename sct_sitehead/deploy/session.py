"""ONNX Runtime sessions for a release: the backbone once per batch, every requested head on its features.

:class:`SiteHeadModel` is the network that :func:`~sct_sitehead.deploy.windows.sliding_window` calls: a batch of
patches in, ``{site: probabilities}`` out. onnxruntime is imported when a session is made, not with this module.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sct_sitehead.errors import InferenceError, IntegrityError, RegistryError, UsageError
from sct_sitehead.registry import graphs
from sct_sitehead.registry.cache import sha256_file

logger = logging.getLogger(__name__)

#: Name of the backbone's single input and of every head's output (DESIGN.md, "Model contract").
IMAGE_INPUT = "image"
HEAD_OUTPUT = "probabilities"

Provider = str | tuple[str, dict[str, str]]


def max_threads() -> int:
    """The most CPU threads a session may be given: the machine's CPU count. More only oversubscribes the cores,
    and ONNX Runtime makes every thread it is asked for (100,000 of them took 5 GB and never started)."""
    return os.cpu_count() or 1


def check_threads(threads: int | None, name: str = "threads") -> None:
    """Raise UsageError unless ``threads`` is None or 1 to :func:`max_threads`."""
    if threads is None:
        return
    limit = max_threads()
    if not 1 <= int(threads) <= limit:
        raise UsageError(f"{name} must be between 1 and {limit} (the CPUs of this machine), got {threads}")


def select_providers(device: str) -> list[Provider]:
    """ONNX Runtime execution providers for a device name, CPU always last as the fallback.

    Args:
        device: ``"auto"`` (CUDA when onnxruntime has it, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        Provider names, the CUDA one as ``("CUDAExecutionProvider", {"device_id": "N"})``.

    Raises:
        UsageError: unknown device name.
        InferenceError: CUDA asked for but this onnxruntime has no CUDA provider.
    """
    import onnxruntime as ort

    name = str(device).strip().lower()
    cpu = "CPUExecutionProvider"
    if name == "cpu":
        return [cpu]
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider"
    if name == "auto":
        return [(cuda, {"device_id": "0"}), cpu] if cuda in available else [cpu]
    device_id = _cuda_index(name, device)
    if cuda not in available:
        raise InferenceError(
            f"device {device!r} asked for, but this onnxruntime has no CUDA provider "
            f"(available: {', '.join(available)}); install the GPU build: pip uninstall onnxruntime, then "
            "pip install onnxruntime-gpu (the two cannot be installed side by side); or use -device cpu"
        )
    return [(cuda, {"device_id": str(device_id)}), cpu]


def _cuda_index(name: str, device: str) -> int:
    if name == "cuda":
        return 0
    prefix, _, index = name.partition(":")
    if prefix == "cuda" and index.isdigit():
        return int(index)
    raise UsageError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class SiteHeadModel:
    """A release's backbone and the requested heads as ONNX Runtime sessions, created once.

    Calling the model on a batch runs the backbone once and every head on the backbone features it names, the
    features staying on the device (I/O binding) between the two.
    """

    def __init__(
        self,
        backbone: Path,
        heads: Mapping[str, Path],
        *,
        device: str = "auto",
        threads: int | None = None,
        optimized_dir: Path | None = None,
        sha256: Mapping[Path, str] | None = None,
    ) -> None:
        """Start ONNX Runtime.

        Args:
            backbone: ``backbone.onnx``.
            heads: ``{site: heads/<site>.onnx}``.
            device: see :func:`select_providers`.
            threads: intra-op threads per session (None: ONNX Runtime's default, one per physical core).
            optimized_dir: folder where the optimised graphs are saved and reused (the cache's ``ort/``).
            sha256: the registry's sha256 of model files: such a file's bytes are checked against it before ONNX
                Runtime reads them, and its optimised graph is found by it (a file not listed is hashed as read).

        Raises:
            RegistryError: the models do not follow the contract (input/output names).
            IntegrityError: a model file's bytes do not have the sha256 given for it.
            InferenceError: ONNX Runtime cannot load a model, or CUDA was asked for and is not usable.
            UsageError: no head, or ``threads`` outside 1 to the machine's CPU count.
        """
        if not heads:
            raise UsageError("SiteHeadModel needs at least one head")
        check_threads(threads)
        self._providers = select_providers(device)
        self._threads = threads
        self._optimized_dir = Path(optimized_dir) if optimized_dir is not None else None
        self._sha256 = {Path(path): digest for path, digest in (sha256 or {}).items()}
        self.backbone_path = Path(backbone)
        self.head_paths = {site: Path(path) for site, path in heads.items()}
        self._backbone = self._open(self.backbone_path)
        # On CPU, several heads run side by side, each on its share of the threads: a head is a few passes over
        # full-resolution tensors, which one thread does almost as fast as two. Measured (2 cores, 4 heads of
        # lesion@1.1.0 on a 48x64x192 window): 190-197 ms one after the other on 2 threads, 146-160 ms two at a
        # time on 1 thread each.
        cpu = self._backbone.get_providers()[0] == "CPUExecutionProvider"
        total = int(threads) if threads else (os.cpu_count() or 1)
        self._head_workers = min(len(heads), total) if cpu else 1
        head_threads = max(1, total // self._head_workers) if self._head_workers > 1 else threads
        names = [node.name for node in self._backbone.get_inputs()]
        if names != [IMAGE_INPUT]:
            raise RegistryError(
                f"{self.backbone_path.name}: the backbone must have one input named {IMAGE_INPUT!r}, has {names}; "
                "re-export the model following DESIGN.md"
            )
        self.backbone_outputs = [node.name for node in self._backbone.get_outputs()]
        self._heads: dict[str, Any] = {}
        self._executor: ThreadPoolExecutor | None = None
        self.head_inputs: dict[str, list[str]] = {}
        for site, path in self.head_paths.items():
            session = self._open(path, head_threads)
            inputs = [node.name for node in session.get_inputs()]
            unknown = [name for name in inputs if name not in self.backbone_outputs]
            if unknown or not inputs:
                raise RegistryError(
                    f"head {site!r} ({path.name}) reads {inputs}, but the backbone only outputs "
                    f"{self.backbone_outputs}; this head belongs to another backbone (check the release)"
                )
            outputs = [node.name for node in session.get_outputs()]
            if HEAD_OUTPUT not in outputs:
                raise RegistryError(
                    f"head {site!r} ({path.name}) has outputs {outputs}, expected one named {HEAD_OUTPUT!r}"
                )
            self._heads[site] = session
            self.head_inputs[site] = inputs
        needed = {name for inputs in self.head_inputs.values() for name in inputs}
        self._features = [name for name in self.backbone_outputs if name in needed]
        self._device_type, self._device_id = self._output_device()
        if str(device).lower().startswith("cuda") and self.provider != "CUDAExecutionProvider":
            raise InferenceError(
                f"device {device!r} asked for, but ONNX Runtime fell back to {self.provider} (CUDA or cuDNN "
                "libraries missing or no GPU visible); check nvidia-smi and the onnxruntime-gpu install, or use "
                "-device cpu"
            )

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the backbone, e.g. ``"CPUExecutionProvider"``."""
        return str(self._backbone.get_providers()[0])

    @property
    def sites(self) -> list[str]:
        return list(self._heads)

    def output_channels(self, site: str) -> int | None:
        """The channels a head's ``probabilities`` has, when its graph fixes them (None: only known at run time)."""
        for node in self._heads[site].get_outputs():
            if node.name == HEAD_OUTPUT and len(node.shape) == 5 and isinstance(node.shape[1], int):
                return int(node.shape[1])
        return None

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Probabilities of every head for a batch of patches.

        Args:
            batch: (N, 1, x, y, z) float32.

        Returns:
            ``{site: (N, K, x, y, z) float32}``.

        Raises:
            InferenceError: ONNX Runtime failed (shape not divisible by the network's downsampling, out of memory).
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 5 or batch.shape[1] != 1:
            raise InferenceError(f"the backbone takes (N, 1, X, Y, Z) float32, got shape {batch.shape}")
        try:
            binding = self._backbone.io_binding()
            binding.bind_cpu_input(IMAGE_INPUT, batch)
            for name in self._features:
                # Features stay where the backbone computed them (GPU memory on CUDA): heads read them there.
                binding.bind_output(name, self._device_type, self._device_id)
            self._backbone.run_with_iobinding(binding)
            features = dict(zip(self._features, binding.get_outputs()))

            def run_head(site: str) -> np.ndarray:
                session = self._heads[site]
                head_binding = session.io_binding()
                for name in self.head_inputs[site]:
                    head_binding.bind_ortvalue_input(name, features[name])
                head_binding.bind_output(HEAD_OUTPUT, "cpu")
                session.run_with_iobinding(head_binding)
                probabilities: np.ndarray = head_binding.copy_outputs_to_cpu()[0]
                return probabilities

            if self._head_workers > 1:
                results = dict(zip(self._heads, self._pool().map(run_head, self._heads)))
            else:
                results = {site: run_head(site) for site in self._heads}
        except Exception as exc:
            raise InferenceError(
                f"ONNX Runtime failed on a batch of shape {batch.shape} ({self.provider}): {_one_line(exc)}; "
                "each spatial size must be a multiple of the release's divisor; on out-of-memory lower the batch "
                "size or use -device cpu"
            ) from exc
        return results

    def _pool(self) -> ThreadPoolExecutor:
        """Threads running heads side by side (ONNX Runtime releases the GIL while it runs), made on first use."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._head_workers, thread_name_prefix="head")
        return self._executor

    def _output_device(self) -> tuple[str, int]:
        if self.provider == "CUDAExecutionProvider":
            options = self._backbone.get_provider_options().get("CUDAExecutionProvider", {})
            return "cuda", int(options.get("device_id", 0))
        return "cpu", 0

    def _options(self, level: Any = None, threads: int | None = None) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or self._threads or 0)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        # Measured on 2 CPU cores, a 5-conv 3D U-Net stub (16/32 channels) on batches of 4x64^3: peak RSS 343 MiB
        # with the CPU arena, 295 MiB without, same speed (2.0-2.2 s): tensors here are few and large, so the
        # arena only rounds them up and keeps them after the run.
        options.enable_cpu_mem_arena = False
        # Backbone and heads have a thread pool each and run one after the other; a pool spinning after its run
        # steals cores from the next. Measured (backbone + 3 heads, 2 threads, 2 cores): 0.31 s -> 0.245 s per
        # batch and 20 % less CPU time with spinning off.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if level is not None:
            options.graph_optimization_level = level
        return options

    def _open(self, path: Path, threads: int | None = None) -> Any:
        """A session for ``path`` with ``threads`` intra-op threads (None: the model's ``threads``): from its
        optimised graph when one can be had, else from the file's verified bytes."""
        import onnxruntime as ort

        if not path.is_file():
            raise RegistryError(f"model file {path} does not exist; fetch the release again (sct_sitehead models)")
        if self._optimized_dir is not None:
            session = self._open_optimized(path, self._optimized_dir, threads)
            if session is not None:
                return session
        model = read_model(path, self._sha256.get(path))
        try:
            options = self._options(threads=threads)
            return ort.InferenceSession(model, sess_options=options, providers=self._providers)
        except Exception as exc:
            raise InferenceError(
                f"ONNX Runtime cannot load {path}: {_one_line(exc)}; the file may be corrupt (verify the cache: "
                "sct_sitehead cache verify) or need a newer onnxruntime"
            ) from exc

    def _open_optimized(self, path: Path, folder: Path, threads: int | None = None) -> Any | None:
        """Session from the optimised graph saved in ``folder``, saving it first if needed; None when that is not
        possible.

        The graph is found by the model file's verified sha256 and used only when its bytes match the sha256
        recorded when it was saved (:mod:`~sct_sitehead.registry.graphs`). It is saved at the "extended" level,
        which is provider-specific but not CPU-model-specific (the "all" level adds layout changes for this very
        CPU), and loaded again at the "all" level.
        """
        import onnxruntime as ort

        first = self._providers[0]
        tag = first if isinstance(first, str) else f"{first[0]}{first[1].get('device_id', '')}"
        expected = self._sha256.get(path)
        saved = graphs.graph_path(folder, expected or sha256_file(path), f"ort{ort.__version__}-{tag}")
        graph = graphs.read_graph(saved)
        if graph is None:
            self._save_optimized(read_model(path, expected), path, saved)
            graph = graphs.read_graph(saved)
        if graph is None:
            return None
        try:
            options = self._options(threads=threads)
            return ort.InferenceSession(graph, sess_options=options, providers=self._providers)
        except Exception as exc:
            logger.warning("ignoring optimised graph %s (%s); using %s", saved, _one_line(exc), path.name)
            graphs.discard(saved)
            return None

    def _save_optimized(self, model: bytes, path: Path, saved: Path) -> None:
        """Optimise ``model`` (the verified bytes of ``path``) and save the graph at ``saved``, with its record."""
        import onnxruntime as ort

        def optimise_into(tmp: Path) -> None:
            options = self._options(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
            options.optimized_model_filepath = str(tmp)
            ort.InferenceSession(model, sess_options=options, providers=self._providers)

        try:
            graphs.save_graph(saved, optimise_into)
            logger.debug("saved optimised graph of %s to %s", path.name, saved)
        except Exception as exc:
            logger.warning("cannot save the optimised graph of %s to %s: %s", path.name, saved.parent, _one_line(exc))


def read_model(path: Path, expected: str | None) -> bytes:
    """A model file's bytes, checked against the registry's sha256 when it is given.

    Raises:
        IntegrityError: the bytes have another sha256 (the file changed on disk after it was verified).
        RegistryError: the file cannot be read.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RegistryError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if expected is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise IntegrityError(
                f"model file {path} has sha256 {digest}, expected {expected}: it changed on disk after it was "
                "verified, and ONNX Runtime was not given it. Run `sct_sitehead cache verify`, then run again to "
                "fetch it anew."
            )
    return data


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
