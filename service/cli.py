"""`onnx-explain`: serve the API, explain an image, or build models into the repository."""

import argparse
import contextlib
import io
import itertools
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, get_args

from schemas.explain import MAX_METRIC_STEPS, ExplainMethod, MetricName
from schemas.heatmap import ColormapName, ImageNormalization
from service.settings import Settings

if TYPE_CHECKING:
    import numpy as np
    from onnx_explain_client import ExplainResult, ExplanationResult

    from engines.batch.job import BatchSpec
    from engines.models.loaded import LoadedModel
    from schemas.explain import ExplainRequest, ExplainResponse


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.lifecycle import exit_zero_on_sigterm

    settings = Settings()
    with exit_zero_on_sigterm():
        uvicorn.run(
            "service.app:app_from_environment",
            factory=True,
            host=args.host or settings.host,
            port=args.port or settings.port,
            workers=args.workers or settings.workers,
            log_level=settings.log_level,
            access_log=False,  # the request middleware logs one line per request
            timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        )
    return 0


def _models_build(args: argparse.Namespace) -> int:
    from engines.errors import EngineError
    from engines.models.zoo import build_model

    repository = Path(args.repository) if args.repository else Settings().model_repository
    try:
        folder = build_model(args.name, repository, force=args.force)
    except EngineError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"{args.name}: {folder}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from engines.models.zoo import BUILDERS

    for name in sorted(BUILDERS):
        print(name)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from engines.errors import EngineError
    from engines.graphs.prepared import GraphKey
    from engines.models.loaded import LoadedModel
    from engines.models.repository import MODEL_NAME_PATTERN
    from engines.models.support import find_support
    from engines.runtime.session import RuntimeOptions

    settings = Settings()
    repository = Path(args.repository) if args.repository else settings.model_repository
    if not MODEL_NAME_PATTERN.fullmatch(args.model) or not (repository / args.model).is_dir():
        print(f"error: no model {args.model!r} in {repository}", file=sys.stderr)
        return 2
    try:
        model = LoadedModel(args.model, repository / args.model, RuntimeOptions(providers="cpu"))
        support = {entry.method: entry for entry in find_support(model)}
        print(f"model {model.name}: batch {model.batch_mode}, default layer {model.default_layer}")
        width = max(len(method) for method in support)
        for entry in support.values():
            verdict = "supported" if entry.supported else f"unsupported: {entry.reason}"
            print(f"  {entry.method:<{width}}  {verdict}")
        layers = args.layer or ([model.default_layer] if model.default_layer else [])
        keys = []
        if support["gradcam"].supported:
            keys += [
                GraphKey(layer, wrt_input=False, guided=False, top_k_seeds=top_k, paired=paired)
                for layer in layers
                for top_k in (False, True)
                for paired in (False, True)
            ]
        guided_options = [False, True] if support["guided_backprop"].supported else [False]
        if support["saliency"].supported:
            keys += [
                GraphKey(None, wrt_input=True, guided=guided, top_k_seeds=top_k, paired=paired)
                for guided in guided_options
                for top_k in (False, True)
                for paired in (False, True)
            ]
        for key in keys:
            path = model.gradients.prepare(key, model.gradients.prepared_dir)
            print(path)
    except EngineError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


# `explain`: one image through a running service (--url) or the same engines in-process (--local).

IMAGE_FORMATS = ("overlay", "colormap", "png", "png16")
SPINNER_FRAMES = "|/-\\"
BAR_WIDTH = 30


class _Failure(Exception):
    """A problem to report on stderr in one line, with the exit status to return."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class _ExplainCall:
    image: bytes
    model: str
    method: str
    targets: list[int | str] | None
    top_k: int
    params: dict[str, Any]
    output: dict[str, Any]


class _ProgressBar:
    """`occlusion [#####.....] 40/80`, redrawn in place; a newline once complete.

    A progress listener (engines.runtime.progress): the label is the stage's, else `label`.
    """

    def __init__(self, stream: TextIO, label: str, unit: str = "") -> None:
        self.stream = stream
        self.label = label
        self.unit = unit

    def __call__(self, done: int, total: int, stage: str | None = None) -> None:
        filled = BAR_WIDTH * done // max(total, 1)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        end = "\n" if done >= total else ""
        unit = f" {self.unit}" if self.unit else ""
        self.stream.write(f"\r{stage or self.label} [{bar}] {done}/{total}{unit}{end}")
        self.stream.flush()


@contextmanager
def _spinner(stream: TextIO, label: str, enabled: bool) -> Iterator[None]:
    """While the block runs, a spinner and the seconds elapsed; the line is cleared after."""
    if not enabled:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def spin() -> None:
        line = ""
        for frame in itertools.cycle(SPINNER_FRAMES):
            line = f"{frame} {label} {time.monotonic() - started:.1f}s"
            stream.write(f"\r{line}")
            stream.flush()
            if stop.wait(0.1):
                break
        stream.write("\r" + " " * len(line) + "\r")
        stream.flush()

    thread = threading.Thread(target=spin, name="spinner", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _show_progress(args: argparse.Namespace) -> bool:
    return bool(args.progress) or sys.stderr.isatty()


def _parse_target(text: str) -> int | str:
    return int(text) if text.strip().isdigit() else text


def _parse_param(text: str) -> tuple[str, Any]:
    """`key=value`: the value read as JSON (numbers, true/false, null, lists), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise _Failure(f"--param expects key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _explain_call(args: argparse.Namespace) -> _ExplainCall:
    try:
        image = Path(args.image).read_bytes()
    except OSError as exc:
        raise _Failure(f"cannot read {args.image}: {exc.strerror or exc}") from exc
    output: dict[str, Any] = {"format": [args.format] + (["array"] if args.array_out else [])}
    for field in ("normalize", "colormap", "alpha"):
        if getattr(args, field) is not None:
            output[field] = getattr(args, field)
    return _ExplainCall(
        image=image,
        model=args.model,
        method=args.method,
        targets=[_parse_target(t) for t in args.target] if args.target else None,
        top_k=args.top_k,
        params=dict(_parse_param(p) for p in args.param or []),
        output=output,
    )


def _explain_remote(call: _ExplainCall, args: argparse.Namespace) -> "ExplainResult":
    from onnx_explain_client import DEFAULT_URL, ClientError, ExplainClient, ServiceError

    url = args.url or DEFAULT_URL
    try:
        with (
            ExplainClient(url, timeout=args.timeout, api_key=args.api_key) as service,
            _spinner(sys.stderr, f"{call.method} at {url}", _show_progress(args)),
        ):
            return service.explain(
                call.image,
                call.model,
                call.method,
                targets=call.targets,
                top_k=call.top_k,
                params=call.params,
                output=call.output,
            )
    except ServiceError as exc:
        raise _Failure(str(exc), 2 if exc.status < 500 else 1) from exc
    except ClientError as exc:
        raise _Failure(exc.message, 1) from exc


def _explain_local(call: _ExplainCall, args: argparse.Namespace) -> "ExplainResult":
    from onnx_explain_client import ExplainResult
    from onnx_explain_client.schemas.explain import ExplainResponse as WireResponse
    from pydantic import ValidationError

    from engines.errors import EngineError
    from service.errors import ServiceError as RequestError
    from service.errors import describe_validation_error

    try:
        # Through its JSON, as the service would send it: the client reads its own schema types.
        response = _run_local(call, args)
        return ExplainResult.from_response(
            WireResponse.model_validate_json(response.model_dump_json())
        )
    except (EngineError, RequestError) as exc:
        raise _Failure(exc.message) from exc
    except ValidationError as exc:
        raise _Failure(describe_validation_error(exc)) from exc


def _local_request(call: _ExplainCall) -> "ExplainRequest":
    from schemas.explain import ExplainRequest

    # The image stays in bytes; a stand-in lets the rest be checked as the server checks it.
    fields = {
        "image": "-",
        "method": call.method,
        "targets": call.targets,
        "top_k": call.top_k,
        "params": call.params,
        "output": call.output,
    }
    return ExplainRequest.model_validate(fields)


def _load_model(name: str, repository: Path, settings: Settings) -> "LoadedModel":
    from engines.models.loaded import MODEL_FILE, LoadedModel
    from engines.models.repository import MODEL_NAME_PATTERN

    folder = repository / name
    if not MODEL_NAME_PATTERN.fullmatch(name) or not (folder / MODEL_FILE).is_file():
        raise _Failure(f"no model named {name!r} in {repository}")
    return LoadedModel(name, folder, settings.runtime_options(), settings.cache_dir / name)


def _run_local(call: _ExplainCall, args: argparse.Namespace) -> "ExplainResponse":
    """The explain route's pipeline, with the service's own rendering (service.heatmaps)."""
    from pydantic import ValidationError

    from engines.imaging.decode import decode_image, preprocess
    from engines.methods.registry import EXPLAINERS
    from engines.runtime import progress
    from service.errors import describe_validation_error
    from service.explaining import (
        explain_response,
        image_limits,
        render_explanations,
        resolve_targets,
        work_limits,
    )
    from service.heatmaps import check_output

    settings = Settings()
    request = _local_request(call)
    repository = Path(args.repository) if args.repository else settings.model_repository
    model = _load_model(call.model, repository, settings)
    started = time.perf_counter()
    explainer = EXPLAINERS[request.method]
    try:
        params = explainer.params_model.model_validate(request.params)
    except ValidationError as exc:
        raise _Failure("params." + describe_validation_error(exc)) from exc
    targets = resolve_targets(model, request.targets)
    image = decode_image(call.image, image_limits(settings))
    check_output(request.output, image.shape, model.config.input)
    tensor = preprocess([image], model.config.input)
    decoded = time.perf_counter()
    work = work_limits(settings)
    listening = (
        progress.reporting(_ProgressBar(sys.stderr, request.method))
        if _show_progress(args)
        else contextlib.nullcontext()
    )
    with listening:
        explained = explainer.explain(model, tensor, targets, request.top_k, params, work)
    computed = time.perf_counter()
    explanations = render_explanations(explained, model, image, request.output)
    finished = time.perf_counter()
    stages = (started, decoded, computed, finished)
    return explain_response(
        call.model, request.method, model, explained, explanations, request.top_k, stages
    )


def _output_path(path: Path, target: int, several: bool) -> Path:
    """`path` itself for one explanation; `cam-281.png`, `cam-285.png`, ... for several."""
    return path.with_name(f"{path.stem}-{target}{path.suffix}") if several else path


def _write_file(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise _Failure(f"cannot write {path}: {exc.strerror or exc}") from exc


def _npy_bytes(values: "np.ndarray") -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()


def _write_explanation(
    explanation: "ExplanationResult", args: argparse.Namespace, several: bool
) -> list[str]:
    """Writes the image (and array) of one explanation; says what was written."""
    image = explanation.get(args.format)
    png = image.png
    if png is None:  # the formats the CLI offers are all PNGs
        raise _Failure(f"the `{args.format}` heatmap holds no PNG")
    path = _output_path(Path(args.out), explanation.target, several)
    _write_file(path, png)
    height, width = image.image().shape[:2]
    notes = [f"{path} ({args.format} PNG, {width}x{height})"]
    values = explanation.get("array").values if args.array_out else None
    if values is not None:
        array_path = _output_path(Path(args.array_out), explanation.target, several)
        _write_file(array_path, _npy_bytes(values))
        notes.append(f"{array_path} ({values.dtype} array, shape {values.shape})")
    return notes


def _print_result(result: "ExplainResult", written: list[list[str]]) -> None:
    total = result.timings_ms.get("total")
    took = f" in {total:.0f} ms" if total is not None else ""
    print(f"{result.method} on {result.model}{took}")
    print("predictions:")
    for prediction in result.predictions:
        print(f"  {prediction.index:>5}  {prediction.score:.4f}  {prediction.label}")
    for explanation, notes in zip(result.explanations, written, strict=True):
        print(f"target {explanation.target} ({explanation.label}):")
        for note in notes:
            print(f"  wrote {note}")


def _explain(args: argparse.Namespace) -> int:
    try:
        call = _explain_call(args)
        result = _explain_local(call, args) if args.local else _explain_remote(call, args)
        several = len(result.explanations) > 1
        written = [_write_explanation(e, args, several) for e in result.explanations]
    except _Failure as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.status
    _print_result(result, written)
    return 0


def _add_explain_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    explain = commands.add_parser(
        "explain",
        help="a heatmap for one image, from a running service (--url) or in-process (--local)",
    )
    explain.add_argument("image", help="a PNG, JPEG or WebP file")
    explain.add_argument("--model", required=True, help="a model name, e.g. efficientnet-lite0")
    explain.add_argument(
        "--method", default="gradcam", choices=get_args(ExplainMethod), help="default: gradcam"
    )
    explain.add_argument(
        "--target",
        action="append",
        metavar="T",
        help="a class index or label name (repeatable; default: the top-k predicted classes)",
    )
    explain.add_argument("--top-k", type=int, default=1, help="targets when none is given")
    explain.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="a method parameter (repeatable)"
    )
    explain.add_argument("--format", choices=IMAGE_FORMATS, default="overlay")
    explain.add_argument("--colormap", choices=get_args(ColormapName))
    explain.add_argument("--alpha", type=float, help="opacity of the map in an overlay")
    explain.add_argument("--normalize", choices=get_args(ImageNormalization))
    explain.add_argument("--out", required=True, help="the PNG to write")
    explain.add_argument("--array-out", help="also write the float map as a .npy file")
    where = explain.add_mutually_exclusive_group()
    where.add_argument("--url", help="the service (default: http://127.0.0.1:8000)")
    where.add_argument("--local", action="store_true", help="run the engines here, no server")
    explain.add_argument(
        "--repository", help="model folder for --local (default: ONNX_EXPLAIN_MODEL_REPOSITORY)"
    )
    explain.add_argument("--api-key", help="sent as X-API-Key to the service")
    explain.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the service"
    )
    explain.add_argument(
        "--progress", action="store_true", help="show progress on stderr even if not a terminal"
    )
    explain.set_defaults(handler=_explain)


# `batch`: every image of a folder, list or table, with the engines in-process or on Ray.

BATCH_FORMATS = ("png", "png16", "colormap", "overlay", "array")


def _model_folder(model: str, repository: Path) -> tuple[str, Path]:
    """A model folder given as a path, or a model's name in the repository."""
    from engines.models.loaded import MODEL_FILE
    from engines.models.repository import MODEL_NAME_PATTERN

    given = Path(model)
    if (given / MODEL_FILE).is_file():
        return given.resolve().name, given.resolve()
    if MODEL_NAME_PATTERN.fullmatch(model) and (repository / model / MODEL_FILE).is_file():
        return model, (repository / model).resolve()
    raise _Failure(f"{model!r} is neither a model folder nor a model in {repository}")


def _batch_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.params:
        try:
            params = json.loads(args.params)
        except ValueError as exc:
            raise _Failure(f"--params is not JSON: {exc}") from exc
        if not isinstance(params, dict):
            raise _Failure("--params must be a JSON object")
    params.update(_parse_param(p) for p in args.param or [])
    return params


def _metric_kinds(text: str | None) -> "tuple[MetricName, ...]":
    known = get_args(MetricName)
    kinds = list(dict.fromkeys(k.strip() for k in (text or "").split(",") if k.strip()))
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise _Failure(f"--metrics: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return tuple(k for k in known if k in kinds)


def _batch_spec(args: argparse.Namespace, settings: Settings) -> "BatchSpec":
    from pydantic import ValidationError

    from engines.batch.job import BatchSpec
    from engines.methods.registry import EXPLAINERS
    from schemas.explain import OutputOptions
    from service.errors import describe_validation_error
    from service.explaining import image_limits, work_limits

    repository = Path(args.repository) if args.repository else settings.model_repository
    name, folder = _model_folder(args.model, repository)  # absolute: Ray's workers read it
    fields: dict[str, Any] = {"format": args.format or ["png"]}
    for field in ("normalize", "colormap", "alpha", "size"):
        if getattr(args, field) is not None:
            fields[field] = getattr(args, field)
    try:
        output = OutputOptions.model_validate(fields)
    except ValidationError as exc:
        raise _Failure("output." + describe_validation_error(exc)) from exc
    try:
        params = EXPLAINERS[args.method].params_model.model_validate(_batch_params(args))
    except ValidationError as exc:
        raise _Failure("params." + describe_validation_error(exc)) from exc
    source = Path(args.input).resolve()
    default_output = source.with_name(f"{source.stem or source.name}-maps")
    return BatchSpec(
        model_name=name,
        model_folder=folder,
        method=args.method,
        params=params,
        output_dir=(Path(args.output) if args.output else default_output).resolve(),
        output=output,
        target=_parse_target(args.target) if args.target is not None else None,
        metrics=_metric_kinds(args.metrics),
        metric_steps=args.metric_steps,
        runtime=settings.runtime_options(),
        cache_dir=(settings.cache_dir / name).resolve(),
        batch_policy=settings.batch_policy(),
        images_in_flight=args.images_in_flight,
        memory_budget_bytes=settings.memory_budget_bytes or None,
        image_limits=image_limits(settings),
        work_limits=work_limits(settings),
    )


def _batch(args: argparse.Namespace) -> int:
    from engines.batch.inputs import read_inputs
    from engines.batch.job import run_job
    from engines.errors import EngineError

    settings = Settings()
    try:
        spec = _batch_spec(args, settings)
        items = read_inputs(Path(args.input).resolve(), args.column, spec.output_dir)
        bar = _ProgressBar(sys.stderr, args.method, "images") if _show_progress(args) else None
        if args.ray:
            from engines.batch.on_ray import RayOptions, run_on_ray

            options = RayOptions(
                address=args.ray,
                actors=args.ray_actors,
                cpus_per_actor=args.ray_cpus_per_actor,
                gpus_per_actor=args.ray_gpus_per_actor,
                images_per_call=args.ray_batch_size,
            )
            summary = run_on_ray(spec, items, options, bar)
        else:
            summary = run_job(spec, items, bar)
    except _Failure as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.status
    except EngineError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    rate = summary.explained / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"{summary.explained} explained, {summary.failed} failed, {summary.skipped} already "
        f"done, of {summary.total} images in {summary.seconds:.1f} s ({rate:.1f} images/s)"
    )
    print(f"manifest: {spec.output_dir / 'manifest.jsonl'}")
    return 0


def _number(
    kind: type[int] | type[float], low: float, high: float | None = None
) -> Callable[[str], float]:
    """An argparse type: a number of `kind` in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: {bounds}")
        return value

    return parse


def _add_batch_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    batch = commands.add_parser(
        "batch",
        help="a map for every image of a folder, list or CSV/Parquet table, in-process or on Ray",
    )
    batch.add_argument("model", help="a model folder, or a model's name in the repository")
    batch.add_argument(
        "input",
        help="a folder of images, a text file of paths (one a line), or a .csv / .parquet file "
        "with a column of paths",
    )
    batch.add_argument("--method", default="gradcam", choices=get_args(ExplainMethod))
    batch.add_argument(
        "--params", help="method parameters as a JSON object, e.g. '{\"window\": 32}'"
    )
    batch.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="one method parameter (repeatable)"
    )
    batch.add_argument(
        "--target", help="a class index or label for every image (default: each one's top class)"
    )
    batch.add_argument(
        "--output", help="the folder for the maps and manifest.jsonl (default: INPUT-maps)"
    )
    batch.add_argument(
        "--format",
        action="append",
        choices=BATCH_FORMATS,
        help="a file per map and format (repeatable; `array` writes .npy; default: png)",
    )
    batch.add_argument("--size", choices=("input", "model"), help="map size (default: input)")
    batch.add_argument("--colormap", choices=get_args(ColormapName))
    batch.add_argument("--alpha", type=float, help="opacity of the map in an overlay")
    batch.add_argument("--normalize", choices=("minmax", "percentile", "signed", "none"))
    batch.add_argument(
        "--column", default="image", help="the column of image paths in a CSV or Parquet input"
    )
    batch.add_argument(
        "--metrics", help="faithfulness scores for each map: deletion, insertion or both (a,b)"
    )
    batch.add_argument(
        "--metric-steps",
        type=_number(int, 1, MAX_METRIC_STEPS),
        default=32,
        metavar="N",
        help="points of each faithfulness curve, less one (default: 32)",
    )
    batch.add_argument(
        "--repository",
        help="where model names are looked up (default: ONNX_EXPLAIN_MODEL_REPOSITORY)",
    )
    batch.add_argument(
        "--images-in-flight",
        type=_number(int, 1, 1024),
        default=0,
        metavar="N",
        help="images explained at once, on as many threads (default: 4 on CPU, 32 on a GPU)",
    )
    batch.add_argument(
        "--progress", action="store_true", help="show progress on stderr even if not a terminal"
    )
    ray = batch.add_argument_group("Ray (pip install 'onnx-explain[ray]')")
    ray.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on Ray Data: a cluster's address (e.g. ray://head:10001, auto), or `local`",
    )
    ray.add_argument("--ray-actors", type=_number(int, 1), default=1, help="actors, one model each")
    ray.add_argument("--ray-cpus-per-actor", type=_number(float, 0), default=1.0)
    ray.add_argument("--ray-gpus-per-actor", type=_number(float, 0), default=0.0)
    ray.add_argument(
        "--ray-batch-size", type=_number(int, 1), default=8, help="images an actor gets per call"
    )
    batch.set_defaults(handler=_batch)


def _summary(args: argparse.Namespace) -> int:
    from engines.errors import EngineError
    from engines.insight.views import summarize, summary_text

    settings = Settings()
    repository = Path(args.repository) if args.repository else settings.model_repository
    try:
        model = _load_model(args.model, repository, settings)
        graph = model.graph
        summary = summarize(graph, model.input_name, model.config.input)
    except _Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    sys.stdout.write(summary_text(summary, args.model))
    return 0


def _add_summary_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    summary = commands.add_parser("summary", help="print a model's layer table")
    summary.add_argument("model", help="a model folder name in the repository")
    summary.add_argument(
        "--repository", help="model folder (default: ONNX_EXPLAIN_MODEL_REPOSITORY)"
    )
    summary.set_defaults(handler=_summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnx-explain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the HTTP API (settings: ONNX_EXPLAIN_*)")
    serve.add_argument("--host", help="bind address (default: ONNX_EXPLAIN_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: ONNX_EXPLAIN_PORT or 8000)")
    serve.add_argument("--workers", type=int, help="uvicorn worker processes")
    serve.set_defaults(handler=_serve)

    prepare = commands.add_parser(
        "prepare", help="build a model's gradient graphs into its own folder, ahead of time"
    )
    prepare.add_argument("model", help="a model folder name in the repository")
    prepare.add_argument(
        "--layer", action="append", help="CAM layer (repeatable; default: the model's default)"
    )
    prepare.add_argument(
        "--repository", help="model folder (default: ONNX_EXPLAIN_MODEL_REPOSITORY)"
    )
    prepare.set_defaults(handler=_prepare)

    models = commands.add_parser("models", help="models that can be built into the repository")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    build = model_commands.add_parser("build", help="build a known model into the repository")
    build.add_argument("name", help="e.g. efficientnet-lite0")
    build.add_argument("--repository", help="model folder (default: ONNX_EXPLAIN_MODEL_REPOSITORY)")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(handler=_models_build)
    listing = model_commands.add_parser("list", help="names `models build` knows")
    listing.set_defaults(handler=_models_list)
    _add_explain_parser(commands)
    _add_summary_parser(commands)
    _add_batch_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
