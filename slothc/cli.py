"""The ``slothc`` command line.

    slothc explain --arch llama                      # fusion report of a tiny random Llama with LoRA
    slothc explain --arch gemma2 --layers 1 --autocast bf16 --inner aot_eager
    slothc explain --arch qwen3 --option rms_norm=false
    slothc explain --arch llama --load-in-4bit      # QLoRA: the linears quantised by bitsandbytes (NF4)
    slothc bench --workload a                       # the end-to-end training-step benchmark (GPU)
    slothc coverage --jobs 2 --out-dir docs         # every causal-LM architecture, against eager

Each subcommand is an ``argparse`` sub-parser plus one ``_<name>(args) -> int`` function, registered in
``COMMANDS``; ``main`` parses, dispatches and returns the exit status (0 ok, 1 the run failed, 2 bad
usage: an unknown architecture or option, with the valid choices named).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
import time

AUTOCAST = {"none": None, "bf16": "bfloat16", "fp16": "float16"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args, parser)
    except _Usage as e:
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")


# --------------------------------------------------------------------------------------------------
# explain


def _explain_parser(sub) -> None:
    from slothc.options import INNER_COMPILERS

    p = sub.add_parser(
        "explain",
        help="fusion report of a tiny random model of one architecture",
        description="Build a tiny random-weight model of ARCH (any transformers causal-LM model_type), add "
        "LoRA adapters, compile it with slothc, run one forward and backward on a random batch and print "
        "which sites were fused and which near-misses were skipped.",
    )
    p.add_argument("--arch", required=True, metavar="NAME", help="model_type, e.g. llama, qwen3, gemma2")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16, help="sequence length (default 16)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="base weights (adapters stay fp32)")
    p.add_argument("--autocast", choices=AUTOCAST, default="none", help="run under torch.autocast")
    p.add_argument("--inner", choices=INNER_COMPILERS, default="eager", help="compiler after the passes")
    p.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint every decoder layer")
    p.add_argument("--no-lora", action="store_true", help="plain model, every weight trainable")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="QLoRA: load the model through BitsAndBytesConfig(load_in_4bit=True) (NF4, double quant; needs bitsandbytes)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="backend option, repeatable (e.g. rms_norm=false)",
    )
    p.set_defaults(run=_explain)


def _explain(args, parser) -> int:
    import torch

    import slothc
    from slothc import tiny
    from slothc.options import Options

    try:
        tiny.check_arch(args.arch)
    except ValueError as e:
        raise _Usage(str(e)) from None
    options = {"inner": args.inner, **_parse_options(args.option)}
    try:
        Options.from_dict(options)
    except ValueError as e:
        raise _Usage(str(e)) from None
    device = _device(args.device)

    start = time.perf_counter()
    try:
        model = tiny.tiny_model(
            args.arch, layers=args.layers, hidden=args.hidden, seed=args.seed, dtype=getattr(torch, DTYPES[args.dtype])
        )
    except Exception as e:  # the architecture's config or model does not build at this size
        print(f"slothc explain: could not build a tiny {args.arch}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise _Usage("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None
        model = tiny.load_in_4bit(model, getattr(torch, DTYPES[args.dtype]), device=device)
    if args.gradient_checkpointing:
        tiny.enable_checkpointing(model)
    if not args.no_lora:
        model = tiny.add_lora(model, r=args.lora_r, alpha=2 * args.lora_r)
    model.to(device).train()
    batch = tiny.sample_batch(model.config, batch=args.batch, seq=args.seq, seed=args.seed, device=device)
    if "use_cache" in inspect.signature(_forward_of(model)).parameters or _takes_kwargs(model):
        batch["use_cache"] = False  # as SFTTrainer does: no KV cache in training

    autocast = AUTOCAST[args.autocast]
    ctx = torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast else contextlib.nullcontext()
    with ctx:
        report = slothc.explain(model, options=options, **batch)
    seconds = time.perf_counter() - start

    print(report)
    print(_summary(args, report, device, seconds))
    return 0


def _summary(args, report, device, seconds: float) -> str:
    fused = {name: len(sites) for name, sites in report.fused.items() if sites}
    total = sum(fused.values())
    detail = f" ({', '.join(f'{k} {v}' for k, v in fused.items())})" if fused else ""
    setup = [f"{args.layers} layer{'s' if args.layers != 1 else ''}", args.dtype, device.type]
    if args.autocast != "none":
        setup.append(f"autocast {args.autocast}")
    if args.gradient_checkpointing:
        setup.append("checkpointed")
    if args.load_in_4bit:
        setup.append("4-bit")
    return (
        f"{args.arch} ({', '.join(setup)}): {total} site{'s' if total != 1 else ''} fused{detail}, "
        f"{len(report.skipped)} skipped, {report.graphs} graph{'s' if report.graphs != 1 else ''}, {seconds:.1f} s"
    )


# --------------------------------------------------------------------------------------------------
# plumbing


def _forwarding_parser(sub, name: str, module, help: str, run) -> None:
    """A subcommand whose options are ``module.parser``'s and whose work is ``module.main``."""
    p = sub.add_parser(name, help=help, description=module.__doc__.split("\n\n")[0])
    module.parser(p)
    p.set_defaults(run=run, subparser=p)


def _bench_parser(sub) -> None:
    from slothc import train_bench

    _forwarding_parser(sub, "bench", train_bench, "end-to-end LoRA/QLoRA training step: slothc against eager, Inductor, "
                       "Liger-Kernel and Unsloth", _bench)


def _bench(args, parser) -> int:
    from slothc import train_bench

    return train_bench.main(_argv_of(args))


def _coverage_parser(sub) -> None:
    from slothc import coverage

    _forwarding_parser(sub, "coverage", coverage, "every causal-LM architecture of the installed transformers: fused, and "
                       "equal to eager?", _coverage)


def _coverage(args, parser) -> int:
    from slothc import coverage, tiny

    for arch in args.arch or ():
        try:
            tiny.check_arch(arch)
        except ValueError as e:
            raise _Usage(str(e)) from None
    return coverage.main(_argv_of(args))


def _argv_of(args) -> list:
    """The command line of a sub-parser that forwards to a module's ``main``, rebuilt from ``args``."""
    out = []
    for action in args.subparser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value is None or value is False:
            continue
        flag = action.option_strings[-1]
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


COMMANDS = (_explain_parser, _bench_parser, _coverage_parser)


class _Usage(Exception):
    """Bad usage found after parsing: exit status 2 with the message."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slothc", description="slothc: fused LoRA fine-tuning kernels for any Hugging Face causal LM"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _Usage(f"--option takes KEY=VALUE, got {pair!r}")
        low = value.lower()
        options[key] = True if low in ("true", "1", "yes", "on") else False if low in ("false", "0", "no", "off") else value
    return options


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Usage("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
    return device


def _forward_of(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.forward


def _takes_kwargs(model) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(_forward_of(model)).parameters.values())


if __name__ == "__main__":
    sys.exit(main())
