"""`onnx-explain`: serve the API, or build models into the repository."""

import argparse
import sys
from pathlib import Path

from service.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings()
    uvicorn.run(
        "service.app:app_from_environment",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers or settings.workers,
        log_level=settings.log_level,
    )
    return 0


def _models_build(args: argparse.Namespace) -> int:
    from engines.errors import EngineError
    from engines.zoo import build_model

    repository = Path(args.repository) if args.repository else Settings().model_repository
    try:
        folder = build_model(args.name, repository, force=args.force)
    except EngineError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"{args.name}: {folder}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from engines.zoo import BUILDERS

    for name in sorted(BUILDERS):
        print(name)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from engines.errors import EngineError
    from engines.gradients import GraphKey
    from engines.model import LoadedModel
    from engines.repository import MODEL_NAME_PATTERN
    from engines.runtime import RuntimeOptions

    settings = Settings()
    repository = Path(args.repository) if args.repository else settings.model_repository
    if not MODEL_NAME_PATTERN.fullmatch(args.model) or not (repository / args.model).is_dir():
        print(f"error: no model {args.model!r} in {repository}", file=sys.stderr)
        return 2
    try:
        model = LoadedModel(args.model, repository / args.model, RuntimeOptions(providers="cpu"))
        layers = args.layer or ([model.default_layer] if model.default_layer else [])
        keys = [
            GraphKey(layer, wrt_input=False, guided=False, top_k_seeds=top_k)
            for layer in layers
            for top_k in (False, True)
        ]
        keys += [
            GraphKey(None, wrt_input=True, guided=guided, top_k_seeds=top_k)
            for guided in (False, True)
            for top_k in (False, True)
        ]
        for key in keys:
            path = model.gradients.prepare(key, model.gradients.prepared_dir)
            print(path)
    except EngineError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
