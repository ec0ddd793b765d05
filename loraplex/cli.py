"""`loraplex` console script: one entry point for the base, training and the demo."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from loraplex.training.errors import LoraplexError


def cmd_base(args: argparse.Namespace) -> int:
    from loraplex.training.base import ensure_base

    print(ensure_base(rebuild=args.rebuild))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from loraplex.training.run import main as train_main

    return train_main(args.rest)


def cmd_serve(args: argparse.Namespace) -> int:
    from loraplex.dataclass_cli import parse_dataclass_args
    from loraplex.serving.launch import ServeOptions, serve_forever

    options = parse_dataclass_args(ServeOptions, args.rest, "loraplex serve", "serve the base + adapters")
    demo = options.base_model is None and options.adapters is None
    if options.base_model is None:  # the demo wiring lives here, never in the engine
        from loraplex.training.base import ensure_base

        options = dataclasses.replace(options, base_model=str(ensure_base()))
    if demo:
        from loraplex.training.demo import ADAPTERS_DIR, ensure_demo_adapters

        ensure_demo_adapters()  # committed in the repo; trained on first use otherwise
        options = dataclasses.replace(options, adapters=str(ADAPTERS_DIR))
    return serve_forever(options, demo=demo)


def cmd_convert(args: argparse.Namespace) -> int:
    from loraplex.convert.cli import main as convert_main

    return convert_main(args.rest)


def cmd_keys_add(args: argparse.Namespace) -> int:
    from loraplex.serving.auth import add_key

    key = add_key(
        args.file,
        args.name,
        args.adapters,
        admin=args.admin,
        max_concurrent=args.max_concurrent,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
    )
    print(f"added {args.name!r} to {args.file} (only its hash is stored). The key, shown once:", file=sys.stderr)
    print(key)
    return 0


def cmd_adapters_import(args: argparse.Namespace) -> int:
    from loraplex.training.adapter_import import import_adapter

    dest = import_adapter(
        args.src, args.base, args.store, args.id, max_rank=args.max_rank, warn=lambda line: print(line, file=sys.stderr)
    )
    print(f"imported {args.src} as '{dest.name}' into {args.store} (provenance: imported)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from loraplex.demo import run_demo

    return run_demo(retrain=args.retrain, examples=args.examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    base = sub.add_parser("base", help="print the embedded base's path, building it if missing")
    base.add_argument("--rebuild", action="store_true")
    base.set_defaults(func=cmd_base)

    train = sub.add_parser("train", help="QLoRA fine-tuning (same flags as training/run.py)", add_help=False)
    train.set_defaults(func=cmd_train, passthrough=True)

    serve = sub.add_parser("serve", help="Ray Serve: gRPC :9000 + OpenAI HTTP :8000 (see --help)", add_help=False)
    serve.set_defaults(func=cmd_serve, passthrough=True)

    convert = sub.add_parser(
        "convert", help="merge at FP16 and export GGUF / AWQ (the `convert` command)", add_help=False
    )
    convert.set_defaults(func=cmd_convert, passthrough=True)

    keys = sub.add_parser("keys", help="tenant API keys for `serve --api-keys FILE`")
    add = keys.add_subparsers(dest="keys_command", required=True).add_parser(
        "add", help="make a new key, append its hash to FILE and print the key once"
    )
    add.add_argument("--file", required=True, help="key file (YAML), created if missing")
    add.add_argument("--name", required=True, help="tenant name: limits and logs are per name")
    add.add_argument(
        "--adapters", nargs="*", default=[], help="adapter IDs or fnmatch patterns it may use ('' is the base)"
    )
    add.add_argument("--admin", action="store_true", help="may call Load/Unload/PinAdapter, and use every adapter")
    for limit in ("max-concurrent", "max-prompt-tokens", "max-new-tokens"):
        add.add_argument(f"--{limit}", type=int, help="this tenant's own limit")
    add.set_defaults(func=cmd_keys_add)

    adapters = sub.add_parser("adapters", help="adapter store tools")
    imp = adapters.add_subparsers(dest="adapters_command", required=True).add_parser(
        "import", help="check a plain PEFT adapter folder against the base and copy it into a store"
    )
    imp.add_argument("src", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    imp.add_argument("--base", required=True, help="the base model folder the store serves")
    imp.add_argument("--store", required=True, help="adapter store folder (serve --adapters)")
    imp.add_argument("--id", help="adapter ID in the store (default: the folder's name)")
    imp.add_argument("--max-rank", type=int, default=64, help="largest rank accepted (the server's --max-lora-rank)")
    imp.set_defaults(func=cmd_adapters_import)

    demo = sub.add_parser("demo", help="the embedded base + demo tenant adapters, side by side")
    demo.add_argument("--retrain", action="store_true", help="retrain the demo adapters first")
    demo.add_argument("--examples", type=int, default=3, help="answers to print per tenant")
    demo.set_defaults(func=cmd_demo)

    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):  # train/serve parse their own flags (and --help)
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except LoraplexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
