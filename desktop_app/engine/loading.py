"""Open a local Hugging Face model folder or a .gguf file, fully offline, with clear errors for bad input.

`load_model_job` is a job (yields Progress, returns a LoadedModel); `load_model` drives it to the end.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import struct
import threading
from pathlib import Path

from desktop_app.engine.errors import JobCancelled, ModelLoadError
from desktop_app.engine.file_checks import check_model_files, loader_error_text
from desktop_app.engine.jobs import CancelToken, Progress, drive
from desktop_app.engine.memory_estimate import count_weights, refuse_if_too_big
from desktop_app.engine.quantize import (QuantPlan, from_pretrained_kwargs, parameter_count,
                                         plan_quantization, prepare_loaded, quantize_in_memory,
                                         weights_bytes)
from desktop_app.engine.quantize import run_error as quantize_run_error

DTYPES = ("auto", "float32", "float16", "bfloat16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def _offline_env():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def load_model(path, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               on_progress=None, cancel: CancelToken | None = None, quantize: str = "none"):
    return drive(load_model_job(path, dtype, device, trust_remote_code, cancel, quantize), on_progress)


def load_model_job(path, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
                   cancel: CancelToken | None = None, quantize: str = "none"):
    _offline_env()
    cancel = cancel or CancelToken()
    yield Progress(0, 100, "checking files")
    folder, gguf_file = _resolve_path(path)
    check_model_files(folder, gguf_file)  # damaged or hostile files: one sentence, before any parser sees them
    if gguf_file is None:
        config_dict = _read_config(folder)
        _check_architecture(folder, config_dict, trust_remote_code)
        plan = plan_quantization(quantize, config_dict, folder)
        _refuse_if_too_big(count_weights(config_dict, folder, plan.stored is not None), dtype, device, config_dict,
                           plan, folder)
        weights = _check_weights(folder)
        _check_tokenizer(folder)
        config_hash = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:16]
        total_bytes = sum(w.stat().st_size for w in weights)
    else:
        config_dict = {}
        plan = plan_quantization(quantize, config_dict, folder / gguf_file)
        config_hash = _file_hash(folder / gguf_file)
        total_bytes = (folder / gguf_file).stat().st_size
    cancel.check()

    from transformers import AutoConfig

    torch_device, device_map = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, torch_device, config_dict)
    yield Progress(5, 100, "reading configuration")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                            local_files_only=True, **extra)
    except ImportError as err:
        raise ModelLoadError("reading .gguf files needs the 'gguf' package; install it with "
                             "pip install 'interp-workbench[gguf]'.", str(err)) from err
    except ValueError as err:
        raise _gguf_or_config_error(folder, gguf_file, err) from err
    if gguf_file:
        _refuse_if_too_big(count_weights(config), dtype, device, config_dict, plan, folder / gguf_file, True)

    yield Progress(10, 100, f"loading weights ({total_bytes / 2**20:.0f} MiB)")
    quant_kwargs = from_pretrained_kwargs(plan, torch_dtype, torch_device, device_map, after_load=bool(gguf_file))
    weights_map = quant_kwargs.pop("device_map", device_map)
    model = yield from _streaming_progress(
        lambda progress_events: _from_pretrained(folder, config, torch_dtype, torch_device, weights_map,
                                                 trust_remote_code, extra, cancel, progress_events, quant_kwargs))
    if gguf_file and plan.choice != "none":
        quantize_in_memory(model, plan.choice, torch_dtype)
    prepare_loaded(model)
    yield Progress(90, 100, "loading tokenizer")
    tokenizer = _load_tokenizer(folder, trust_remote_code, extra)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    from desktop_app.engine.adapters import make_adapter
    from desktop_app.engine.conformance import check_loadable
    from desktop_app.engine.model import LoadedModel

    adapter = make_adapter(model)
    lm = LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, info=None, path=str(Path(path).resolve()),
                     config_hash=config_hash, source_kind="gguf" if gguf_file else "folder")
    lm.info = _model_info(model, adapter, torch_dtype, device_map, torch_device)
    lm.info.quantize = plan.label
    _smoke_forward(lm, dtype, device, plan)
    yield Progress(95, 100, "checking the hook points (conformance)")
    check_loadable(lm)
    yield Progress(100, 100, "loaded")
    return lm


# ---- checks before anything heavy is imported -------------------------------------------------------------
def _resolve_path(path) -> tuple[Path, str | None]:
    if path is None or not str(path).strip():
        raise ModelLoadError("no model path given; choose a model folder (with config.json) or a .gguf file.")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{p} does not exist; choose a model folder (with config.json) or a .gguf file.")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return p.parent.resolve(), p.name
        if p.name == "config.json":
            return p.parent.resolve(), None
        raise ModelLoadError(f"{p} is a file but not a .gguf file; choose the model's folder (with config.json) "
                             "or a .gguf file.")
    return p.resolve(), None


def _read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"there is no config.json in {folder}: it is not a Hugging Face model folder; "
                             "choose the folder that holds config.json and the weights.")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{cfg} is not valid JSON ({err}); restore the original file.") from err
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(f"{cfg} has no model_type; it is not a transformers model configuration.")
    return data


def _check_architecture(folder: Path, config: dict, trust_remote_code: bool) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING_NAMES:
        return
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            f"the model in {folder} ({model_type}) needs its own Python code from the folder (trust_remote_code); "
            "turn on 'Trust remote code' only if you trust where this folder came from.")
    if not config.get("auto_map"):
        raise ModelLoadError(f"model_type {model_type!r} in {folder / 'config.json'} is not an architecture this "
                             "version of transformers knows; update transformers or choose another model.")


def _safetensors_problem(path: Path) -> str | None:
    """Checks the header and that the file is as long as the header says (catches truncated downloads)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return "is empty or truncated"
            (n,) = struct.unpack("<Q", raw)
            if n > min(size, 100 * 2**20):
                return "has a corrupt header"
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return "has a corrupt header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    if 8 + n + (max(ends) if ends else 0) > size:
        return "is truncated (shorter than its header says)"
    return None


def _check_weights(folder: Path) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    bins = sorted(p for p in folder.glob("*.bin") if p.name.startswith(("pytorch_model", "model")))
    index = next(iter(sorted(folder.glob("*.index.json"))), None)
    if index is not None:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as err:
            raise ModelLoadError(f"{index} is not a valid weights index; restore the original file.") from err
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelLoadError(f"weight shard {missing[0]} listed in {index.name} is missing from {folder}; "
                                 "copy all shards into the folder.")
    if not safetensors and not bins:
        raise ModelLoadError(f"there are no weights (*.safetensors or pytorch_model*.bin) in {folder}; "
                             "copy the model's weight files into the folder.")
    for st in safetensors:
        problem = _safetensors_problem(st)
        if problem:
            raise ModelLoadError(f"the weights file {st} {problem}; download or copy it again.")
    return safetensors or bins


def _check_tokenizer(folder: Path) -> None:
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"there is no tokenizer in {folder} (tokenizer.json, tokenizer.model or "
                             "vocab.json + merges.txt); copy the model's tokenizer files into the folder.")


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
    h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]


# ---- device and dtype -----------------------------------------------------------------------------------
def _refuse_if_too_big(count, dtype, device, config_dict, plan, where, gguf=False) -> None:
    torch_device, device_map = _resolve_device(device)
    resolved = str(_resolve_dtype(dtype, torch_device, config_dict)).replace("torch.", "")
    refuse_if_too_big(count, resolved, plan, torch_device, device_map, where, quantised_after_load=gguf)


def _resolve_device(device: str):
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0"), "auto"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps"), None
        return torch.device("cpu"), None
    if device == "cpu":
        return torch.device("cpu"), None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device} was chosen but this machine has no usable CUDA GPU "
                                 "(or torch is a CPU build); choose cpu or auto.")
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise ModelLoadError(f"{device!r} is not a device name; use cuda or cuda:N.") from err
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"{device} does not exist: this machine has {torch.cuda.device_count()} GPU(s); "
                                 "choose cuda:0 or auto.")
        return torch.device("cuda", index), None
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelLoadError("device mps (Apple GPU) is not available on this machine; choose cpu or auto.")
        return torch.device("mps"), None
    raise ModelLoadError(f"unknown device {device!r}; choose auto, cpu, cuda, cuda:N or mps.")


def _resolve_dtype(dtype: str, device, config: dict):
    import torch

    dtype = (dtype or "auto").strip().lower()
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    if dtype == "auto":
        saved = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        if device.type == "cpu" or saved not in ("float16", "bfloat16"):
            return torch.float32
        if saved == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return getattr(torch, saved)
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"bfloat16 is not supported by GPU {device}; choose float16 or float32.")
    return getattr(torch, dtype)


# ---- the heavy part -----------------------------------------------------------------------------------
class _Handoff:
    """The tap's `events`: each Progress goes to the job's consumer as it happens. The queue holds one event, so
    the loading thread is never more than one event ahead of what the consumer has seen; `stop` ends a put that
    waits for a consumer who has gone away."""

    def __init__(self, stop: threading.Event):
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = stop

    def append(self, event) -> None:
        while not self._stop.is_set():
            try:
                self.queue.put(event, timeout=0.05)
                return
            except queue.Full:
                continue
        raise JobCancelled()


def _streaming_progress(load):
    """Run `load(events)` (from_pretrained with its per-tensor tap) in a helper thread and yield the Progress the
    tap reports while the weights load, instead of after from_pretrained returns. The helper runs in the caller's
    grad mode (the UI worker loads under inference_mode). Its exception, a cancel included, is raised here; if
    the consumer stops (generator closed), the helper is stopped at the tap's next report and waited for, so no
    second thread keeps filling memory."""
    import torch

    stop = threading.Event()
    handoff = _Handoff(stop)
    outcome: dict = {}
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def helper():
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                outcome["value"] = load(handoff)
        except BaseException as err:  # noqa: BLE001 - handed to the job's thread and raised there
            outcome["error"] = err

    thread = threading.Thread(target=helper, name="interp-workbench-load-weights", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not handoff.queue.empty():
            try:
                yield handoff.queue.get(timeout=0.05)
            except queue.Empty:
                continue
    finally:
        stop.set()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@contextlib.contextmanager
def _weights_progress(cancel: CancelToken, events: list):
    """Reports transformers' per-tensor loading loop as Progress and lets a cancel stop it."""
    try:
        import transformers.core_model_loading as cml
    except ImportError:
        yield
        return
    original = getattr(cml, "tqdm", None)
    if original is None:
        yield
        return

    def reporting(iterable=None, *args, **kwargs):
        items = list(iterable) if iterable is not None else []
        total = max(len(items), 1)
        for i, item in enumerate(items):
            cancel.check()
            if i % max(total // 50, 1) == 0:
                events.append(Progress(10 + int(75 * i / total), 100, f"loading weights {i}/{total}"))
            yield item

    cml.tqdm = reporting
    try:
        yield
    finally:
        cml.tqdm = original


def _from_pretrained(folder, config, torch_dtype, torch_device, device_map, trust_remote_code, extra, cancel,
                     events, quant_kwargs=None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, local_files_only=True,
                  attn_implementation="eager", **extra, **(quant_kwargs or {}))
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with _weights_progress(cancel, events):
            model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, **kwargs)
    except JobCancelled:
        raise
    except torch.OutOfMemoryError as err:
        raise ModelLoadError(f"the model in {folder} does not fit in memory; choose device auto (spreads it over "
                             "GPUs and CPU) or a smaller dtype.", str(err)) from err
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EnvironmentError) as err:
        what = f"{folder / extra['gguf_file']}" if extra else str(folder)
        raise ModelLoadError(f"could not load the weights in {what}: {_first_line(err)}; check that the files are "
                             "complete and belong to this config.", str(err)) from err
    if device_map is None:
        model.to(torch_device)
    return model


def _load_tokenizer(folder, trust_remote_code, extra):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                             local_files_only=True, **extra)
    except Exception as err:  # tokenizers raise many kinds; all mean the same to the user
        raise ModelLoadError(f"the tokenizer in {folder} could not be loaded: {_first_line(err)}; copy the model's "
                             "tokenizer files again.", str(err)) from err


def _gguf_or_config_error(folder, gguf_file, err):
    msg = _first_line(err)
    if gguf_file and "not supported" in msg:
        return ModelLoadError(f"{folder / gguf_file}: {msg.rstrip('.')}; transformers can dequantise llama, mistral, "
                              "qwen2, gemma, phi3, gpt2 and a few other GGUF architectures.")
    where = folder / gguf_file if gguf_file else folder / "config.json"
    return ModelLoadError(f"could not read the configuration in {where}: {msg}", str(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return loader_error_text((text[0] if text else type(err).__name__)[:300])


def _model_info(model, adapter, torch_dtype, device_map, torch_device):
    from desktop_app.engine.model import ModelInfo

    top = model.config
    # multimodal checkpoints (Gemma 3 4B and up) keep the language model's shape in their text config
    cfg = top.get_text_config() if hasattr(top, "get_text_config") else top
    n_heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head"))
    d_model = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))
    d_head = int(getattr(cfg, "head_dim", None) or d_model // n_heads)
    d_mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d_model
    n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or \
        getattr(cfg, "n_ctx", None) or 2048
    params = parameter_count(model)
    memory = weights_bytes(model)
    hf_map = getattr(model, "hf_device_map", None)
    if hf_map and len(set(map(str, hf_map.values()))) > 1:
        device_text = "+".join(sorted({_device_text(v) for v in hf_map.values()}))
    else:
        device_text = str(next(model.parameters()).device)
    return ModelInfo(
        architecture=(top.architectures or [type(model).__name__])[0] if getattr(top, "architectures", None)
        else type(model).__name__,
        model_type=top.model_type,
        n_layers=len(adapter.blocks),
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        d_model=d_model,
        d_head=d_head,
        d_mlp=int(d_mlp),
        vocab_size=int(cfg.vocab_size),
        n_ctx=int(n_ctx),
        dtype=str(torch_dtype).replace("torch.", ""),
        device=device_text,
        n_params=int(params),
        memory_bytes=int(memory),
        parallel_attn_mlp=adapter.parallel_attn_mlp,
    )


def _device_text(v) -> str:
    return f"cuda:{v}" if isinstance(v, int) else str(v)


def _smoke_forward(lm, dtype: str, device: str, plan: QuantPlan = QuantPlan()) -> None:
    """One tiny forward pass: a dtype the device cannot compute fails here, with a message, not mid-analysis."""
    import torch

    ids = torch.tensor([[0, 1]], device=lm.input_device)
    try:
        with torch.inference_mode():
            lm.model(input_ids=ids)
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError) as err:
        if plan.active:
            raise quantize_run_error(plan, lm.info.device, err) from err
        if not isinstance(err, (RuntimeError, NotImplementedError)):
            raise
        raise ModelLoadError(f"dtype {lm.info.dtype} does not run on {lm.info.device} ({_first_line(err)}); "
                             "choose float32 or another device.", str(err)) from err


def wrap_model(model, tokenizer=None, path: str = "<in memory>"):
    """A LoadedModel around a transformers model built in memory (benchmarks, tests, trainers)."""
    import torch
    from desktop_app.engine.adapters import make_adapter
    from desktop_app.engine.model import LoadedModel

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = make_adapter(model)
    dtype = next(model.parameters()).dtype
    lm = LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, info=None, path=path, config_hash="")
    lm.info = _model_info(model, adapter, dtype, None, torch.device("cpu"))
    from desktop_app.engine.conformance import check_loadable
    check_loadable(lm)
    return lm
