"""`tabshard quantize` and `tabshard quant-report`: requantize a model below its source precision.

Schemes (the report's rows, and ``quantize --scheme``) are written ``LINEARS[+emb=CHOICE]``:

``source``                 the model as loaded (SmolLM2: Q4_1 linears, Q8_0 embedding)
``METHOD:SPEC``            every linear matrix with one quantizer and format, e.g. ``gptq:s3g32``
                           (methods: rtn, clip = importance-weighted clip search, hqq, gptq;
                           specs: kernels.quant.QuantSpec names, a|s + bits + g + group)
``mixed@B``                per-tensor formats chosen for B bits/weight on the linear layers
``...+emb=CHOICE``         the embedding/LM head too, e.g. ``+emb=clip:s4g32``

Calibration is on the tail of the Python docs, evaluation on their head (tabshard/calibration.py).
"""
from __future__ import annotations

import json
import sys
import time

from tabshard.errors import TabshardError

DEFAULT_SCHEMES = (
    "source",
    "rtn:a4g64", "rtn:s4g64", "gptq:s4g64", "gptq:a4g64",
    "rtn:a3g32", "clip:a3g32", "gptq:a3g32", "gptq:s3g32", "rtn:s3g64", "gptq:s3g64",
    "mixed@4.0",
    "rtn:s2g32", "gptq:s2g32", "mixed@3.0", "mixed@2.75",
    "source+emb=clip:s4g32", "source+emb=rtn:s4g32", "gptq:s4g64+emb=clip:s4g32", "mixed@3.0+emb=clip:s4g32",
)
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Water boils at a temperature of",
    "The three primary colors are",
)


def parse_scheme(scheme: str) -> tuple[str, str]:
    """'gptq:s3g32+emb=clip:s4g32' -> ('gptq:s3g32', 'clip:s4g32')."""
    from tabshard.calibration import SOURCE, parse_choice

    linears, _, rest = scheme.partition("+")
    emb = SOURCE
    if rest:
        if not rest.startswith("emb="):
            raise TabshardError(f"bad scheme {scheme!r}: after '+' expected emb=CHOICE")
        emb = rest[4:]
    try:
        for c in ([] if linears.startswith("mixed@") else [linears]) + [emb]:
            parse_choice(c) if c != SOURCE else None
        if linears.startswith("mixed@"):
            float(linears[6:])
    except (ValueError, IndexError) as exc:
        raise TabshardError(f"bad scheme {scheme!r}: {exc}") from None
    return linears, emb


def scheme_plan(cal, scheme: str, alphas_fn) -> dict:
    from tabshard.calibration import mixed_plan, parse_choice, uniform_plan

    linears, emb = parse_scheme(scheme)
    if linears.startswith("mixed@"):
        return mixed_plan(cal, alphas_fn(), bits_per_weight=float(linears[6:]), embedding=emb)
    for c in (linears, emb):
        if c != "source" and parse_choice(c)[0] not in ("rtn", "clip", "gptq", "hqq"):
            raise TabshardError(f"unknown method in {c!r}")
    return uniform_plan(cal.config.n_layers, linears, emb)


def run_report(source, eval_ids, calib_ids, prompt_ids, schemes, *, gen_tokens: int = 24, sens_tokens: int = 512,
               log=None, cache_dir: str | None = None) -> list[dict]:
    """One row per scheme: bits/weight (linears), bytes (whole model), perplexity, agreement,
    seconds to quantize. ``source`` is ModelWeights; ids are token lists."""
    from tabshard import calibration as C

    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    cal = C.Calibrator(source, calib_ids, cache_dir=cache_dir)
    log(f"calibration: {len(calib_ids)} tokens, Hessians in {time.perf_counter() - t0:.1f}s")
    targets = [cal.dense.greedy(p, gen_tokens) for p in prompt_ids]
    alphas_cache = {}

    def alphas():
        if not alphas_cache:
            t = time.perf_counter()
            alphas_cache["costs"] = C.estimated_costs(cal, calib_ids[:sens_tokens])
            log(f"sensitivity probes in {time.perf_counter() - t:.1f}s (delta NLL per token): {alphas_cache['costs'].summary()}")
        return alphas_cache["costs"]

    rows = []
    for scheme in schemes:
        plan = scheme_plan(cal, scheme, alphas)
        w = cal.assemble(plan)
        dense = cal.dense_of(plan)
        ppl = dense.perplexity(eval_ids)
        agree = sum(dense.agreement(p, tg) for p, tg in zip(prompt_ids, targets)) / max(len(prompt_ids), 1)
        choices = sorted(set(plan.values()))
        row = {
            "scheme": scheme,
            "bits_per_weight": round(C.linear_bits_per_weight(w), 4),
            "bytes": C.model_bytes(w),
            "embedding_bytes": w.embedding.nbytes,
            "perplexity": round(ppl, 4),
            "agreement": round(agree, 4),
            "quantize_s": round(_scheme_seconds(cal, plan), 2),
            "formats": choices,
        }
        if scheme.startswith("mixed@"):
            from collections import Counter

            row["plan_summary"] = {t: dict(Counter(plan[f"blk.{i}.{t}"] for i in range(cal.config.n_layers))) for t in C.LINEAR_TYPES}
            costs = alphas()
            row["predicted_delta_nll"] = round(sum(costs.cost(cal, n, c) for n, c in plan.items()), 4)
        rows.append(row)
        log(f"{scheme:32s} {row['bits_per_weight']:6.3f} bpw {row['bytes'] / 1e6:7.2f} MB ppl {ppl:10.3f} agree {agree:.3f} quantize {row['quantize_s']:.1f}s")
    src = next((r for r in rows if r["scheme"] == "source"), None)
    for r in rows:
        if src:
            r["ppl_ratio"] = round(r["perplexity"] / src["perplexity"], 4)
    return rows


def _scheme_seconds(cal, plan: dict) -> float:
    """Seconds this plan's quantization takes from scratch: per-choice totals apportioned by
    how many of each choice's cached tensors the plan uses."""
    counts = {}
    for name, c in plan.items():
        counts[c] = counts.get(c, 0) + 1
    total = 0.0
    for c, n in counts.items():
        cached = sum(1 for key in cal._cache if isinstance(key, tuple) and len(key) == 2 and key[1] == c)
        if cached:
            total += cal.seconds.get(c, 0.0) * n / cached
    return total


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        method = r["scheme"].split(":")[0].split("@")[0].split("+")[0]
        marker = {"source": "*", "rtn": "x", "clip": "s", "gptq": "o", "mixed": "D", "hqq": "^"}.get(method, "o")
        ax.scatter(r["bytes"] / 1e6, r["perplexity"], marker=marker, s=60)
        ax.annotate(r["scheme"], (r["bytes"] / 1e6, r["perplexity"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("model bytes (MB)")
    ax.set_ylabel("perplexity (held-out text, log scale)")
    ax.set_title("tabshard quant-report: perplexity vs bytes")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    lines = ["| scheme | bits/weight (linears) | bytes | perplexity | × source | agreement | quantize s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['bits_per_weight']:.3f} | {r['bytes']:,} | {r['perplexity']:.2f} | "
                     f"{r.get('ppl_ratio', float('nan')):.2f} | {r['agreement']:.3f} | {r['quantize_s']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ commands


def _load(a):
    from tabshard.calibration import limit_blas_threads
    from tabshard.model import open_model
    from tabshard.tokenizer import GGUFTokenizer

    if a.threads:
        limit_blas_threads(a.threads)
    model = open_model(a.model)
    return model, GGUFTokenizer(model), model.load_all()


def cmd_quant_report(a) -> int:
    from tabshard import calibration as C

    model, tok, weights = _load(a)
    _, calib = C.split_ids(tok, 0, a.calib_tokens)
    if a.text:
        try:
            text = open(a.text, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise TabshardError(f"cannot read --text {a.text}: {exc}") from None
        eval_ids = tok.encode(text)[: a.tokens]
        if len(eval_ids) < 2:
            raise TabshardError(f"--text {a.text} has fewer than 2 tokens")
    else:
        eval_ids, _ = C.split_ids(tok, a.tokens, a.calib_tokens)
    schemes = a.scheme or list(DEFAULT_SCHEMES)
    for s in schemes:
        parse_scheme(s)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if (a.json or a.verbose) else (lambda m: None)
    rows = run_report(weights, eval_ids, calib, [tok.encode(p) for p in PROMPTS], schemes, log=log, cache_dir=a.cache)
    if a.plot:
        plot(rows, a.plot)
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"evaluation: {len(eval_ids)} tokens of {a.text or 'Python docs (pydoc_data.topics), head'}; "
              f"calibration: last {a.calib_tokens} tokens of the Python docs")
        print(format_table(rows))
    return 0


def cmd_quantize(a) -> int:
    from coordinator.precision import PrecisionError, fit_tabs
    from tabshard import calibration as C
    from tabshard import qmodel

    given = [x is not None for x in (a.budget_bytes, a.bits_per_weight, a.scheme, a.tab_budgets)]
    if sum(given) != 1:
        raise TabshardError("give exactly one of --budget-bytes, --bits-per-weight, --scheme, --tab-budgets")
    if not a.out.endswith(".tsq"):
        raise TabshardError(f"--out must end in .tsq, got {a.out!r}")
    model, tok, weights = _load(a)
    _, calib = C.split_ids(tok, 0, a.calib_tokens)
    t0 = time.perf_counter()
    cal = C.Calibrator(weights, calib, cache_dir=a.cache)
    emb = a.embedding
    report: dict = {"calibration_tokens": len(calib)}
    try:
        if a.scheme:
            plan = scheme_plan(cal, a.scheme, lambda: C.estimated_costs(cal, calib[:512]))
            if emb:
                plan[C.EMBEDDING] = emb
        else:
            alphas = C.estimated_costs(cal, calib[:512])
            report["sensitivity_delta_nll"] = alphas.summary()
            if a.bits_per_weight is not None:
                plan = C.mixed_plan(cal, alphas, bits_per_weight=a.bits_per_weight, embedding=emb or C.SOURCE)
            elif a.budget_bytes is not None:
                plan = C.mixed_plan(cal, alphas, budget_bytes=a.budget_bytes, embedding=emb)
            else:
                budgets = [int(x) for x in a.tab_budgets.split(",")]
                opts = C.tensor_options(cal, alphas, embedding_fixed=emb)
                layer_of = {n: (None if n == C.EMBEDDING else int(n.split(".")[1])) for n in opts}
                norms = weights.layers[0].attn_norm.nbytes * 2
                tp = fit_tabs(opts, layer_of, budgets, fixed_layer_bytes=norms, head_fixed_bytes=weights.head.output_norm.nbytes)
                plan = tp.plan
                report["tabs"] = [{"layers": list(r), "bytes": b, "budget": bud} for r, b, bud in zip(tp.ranges, tp.tab_bytes, budgets)]
    except PrecisionError as exc:
        raise TabshardError(str(exc)) from None
    w = cal.assemble(plan)
    report.update(bits_per_weight=C.linear_bits_per_weight(w), bytes=C.model_bytes(w), seconds=time.perf_counter() - t0)
    size = qmodel.write(a.out, w, qmodel.source_fields(model), plan, report)
    from collections import Counter

    print(f"wrote {a.out}: {size:,} bytes, {report['bits_per_weight']:.3f} bits/weight on the linears, "
          f"{report['seconds']:.0f}s; formats: " + ", ".join(f"{c}×{n}" for c, n in sorted(Counter(plan.values()).items())))
    if "tabs" in report:
        for i, t in enumerate(report["tabs"]):
            print(f"  tab {i}: layers {t['layers'][0]}-{t['layers'][1]}, {t['bytes']:,} of {t['budget']:,} bytes")
    return 0


def add_commands(sub) -> None:
    def common(p):
        p.add_argument("--model", metavar="PATH", help="source model: a GGUF or .tsq (default: SmolLM2-135M-Instruct)")
        p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens from the tail of the Python docs")
        p.add_argument("--cache", metavar="DIR", help="keep quantized tensors here, keyed by model and calibration text, to reuse across runs")
        p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1: OpenBLAS busy-waits on a shared host; 0 leaves it)")

    q = sub.add_parser("quantize", help="requantize a model to fit a memory budget (writes a .tsq)")
    common(q)
    q.add_argument("--out", required=True, metavar="PATH.tsq")
    q.add_argument("--budget-bytes", type=int, help="whole-model budget; per-tensor formats chosen at least measured cost")
    q.add_argument("--bits-per-weight", type=float, help="budget for the linear layers, in bits per weight including scales")
    q.add_argument("--tab-budgets", metavar="B1,B2,...", help="bytes each tab can hold: choose formats so contiguous layer ranges fit")
    q.add_argument("--scheme", help="one scheme for every linear, e.g. gptq:s3g32 (see quant-report)")
    q.add_argument("--embedding", help="embedding/LM head choice, e.g. clip:s4g32 or source (default: chosen within --budget-bytes, else source)")
    q.set_defaults(func=cmd_quantize)

    r = sub.add_parser("quant-report", help="perplexity, size and agreement of quantization schemes")
    common(r)
    r.add_argument("--text", metavar="PATH", help="evaluate on this UTF-8 file (default: held-out Python docs)")
    r.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (512-token windows)")
    r.add_argument("--scheme", action="append", help="a scheme to report (repeatable; default: the standard set)")
    r.add_argument("--json", action="store_true", help="print the rows as JSON")
    r.add_argument("--plot", metavar="OUT.png", help="write perplexity vs bytes")
    r.add_argument("--verbose", action="store_true", help="progress on stderr")
    r.set_defaults(func=cmd_quant_report)
