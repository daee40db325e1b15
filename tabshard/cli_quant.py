"""`tabshard quantize` and `tabshard quant-report`: requantize a model below its source precision.

Schemes (the report's rows, and ``quantize --scheme``) are written
``LINEARS[+rot[=SEED]][+had[=SEED]][+seq][+emb=CHOICE][+fmt=A/B/...]``:

``source``                 the model as loaded (SmolLM2: Q4_1 linears, Q8_0 embedding)
``METHOD:SPEC``            every linear matrix with one quantizer and format, e.g. ``gptq:s3g32``
                           (methods: rtn, clip = importance-weighted clip search, hqq, gptq;
                           specs: kernels.quant.QuantSpec names, a|s + bits + g + group)
``mixed@B``                per-tensor formats chosen for B bits/weight on the linear layers,
                           scored on calibration-domain text held out from the Hessians
``+rot``                   quantize in a rotated residual basis (tabshard/rotation.py; seed 22
                           unless ``+rot=SEED``): folded into the weights, the same kernels run it
``+had``                   rotate each FFN's hidden space (random signs and a block Walsh-Hadamard,
                           seed 22 unless ``+had=SEED``): the runtime transforms the activation
                           before ffn_down (config.ffn_hadamard); with or without ``+rot``
``+seq``                   sequential GPTQ: each layer calibrated on the quantized layers' outputs
``+damp=D``                GPTQ's damping D (fraction of mean diag H) for every code width, instead
                           of kernels/quantizers.DAMP_BY_BITS: a setting to compare, not a format
``+calib=N``               Hessians from N calibration tokens (the recipe's first N / domains of each
                           calibration domain) instead of ``--calib-tokens``; uniform schemes only
                           (a mixed plan's sensitivity slice follows the run's own calibration)
``+emb=CHOICE``            the embedding/LM head too, e.g. ``+emb=clip:s4g32``
``+fmt=A/B/...``           the GPTQ formats (and ``source``) a mixed@B chooses among, e.g.
                           ``+fmt=s3g64/s4g128/a4g64/source`` (default: mixed_precision.MIXED_FORMATS)

Calibration is a mixed-domain text and evaluation is per held-out domain, none of it seen in
calibration (tabshard/calibration_text.py); ``--text PATH`` adds a domain of your own.
``--quick`` reports only the recommended scheme of each class (``QUICK``).
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import NamedTuple

from protocol.errors import TabshardError

# The full table (the default): each lever with and without, on the classes the targets name.
DEFAULT_SCHEMES = (
    "source",
    "gptq:a4g64", "gptq:a4g64+seq", "gptq:a4g64+rot+seq",
    "gptq:a3g32", "gptq:a3g32+seq", "gptq:a3g32+rot", "gptq:a3g32+rot+seq",
    "gptq:s3g64+seq", "gptq:s3g64+rot+seq",
    "mixed@4.0", "mixed@4.0+seq", "mixed@4.0+rot+seq",
    "mixed@3.0", "mixed@3.0+seq", "mixed@3.0+rot", "mixed@3.0+rot+seq",
    "gptq:s2g32+seq", "gptq:s2g32+rot+seq", "mixed@2.5+rot+seq",
    "mixed@3.0+rot+seq+emb=clip:s4g32",
)
# The recommended scheme of each class (benchmarks/quant_report_full.md), chosen between
# candidates on calibration-domain text held out from the Hessians and from the sensitivity
# slice (--selection), never on the evaluation domains: the FFN rotation (+had) won there at
# <=3.0 and <=2.5 bpw, not at 4 bits; at 4 bits twice the calibration tokens won over +seq,
# +had+seq, damping 0.1 and 1.0. Formats pinned to those measured.
QUICK = {
    "source": "source",
    "4-bit": "gptq:a4g64+calib=12288",
    "<=4.0 bpw": "mixed@4.0+fmt=s3g64/a3g64/s4g64/s4g128/a4g64/source",
    "<=3.0 bpw": "mixed@3.0+rot+had+seq+fmt=a2g64/s3g64/s4g64/source",
    "<=2.5 bpw": "gptq:a2g64+had+seq",
}
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Water boils at a temperature of",
    "The three primary colors are",
)
ROTATION_SEED = 22


class Scheme(NamedTuple):
    linears: str
    embedding: str
    rotation: int | None = None
    sequential: bool = False
    formats: tuple | None = None  # what a mixed@B chooses among (None: the default set)
    ffn_rotation: int | None = None  # +had: the FFN rotation's seed
    damp: float | None = None  # +damp=D: GPTQ's damping (None: quantizers.DAMP_BY_BITS)
    calib_tokens: int | None = None  # +calib=N: Hessians from N calibration tokens (None: the run's)

    @property
    def basis(self) -> tuple:
        """What a Calibrator is built for: (residual rotation seed, FFN rotation seed, damping,
        calibration tokens)."""
        return self.rotation, self.ffn_rotation, self.damp, self.calib_tokens


def parse_scheme(scheme: str) -> Scheme:
    """'gptq:s3g32+rot+seq+emb=clip:s4g32' -> Scheme('gptq:s3g32', 'clip:s4g32', 22, True)."""
    from tabshard.calibration import SOURCE, parse_choice

    linears, *opts = scheme.split("+")
    emb, rotation, sequential, formats, ffn_rotation, damp, calib = SOURCE, None, False, None, None, None, None
    for o in opts:
        if o.startswith("emb="):
            emb = o[4:]
        elif o.startswith("fmt=") and linears.startswith("mixed@"):
            formats = tuple(f if f == SOURCE else f"gptq:{f}" for f in o[4:].split("/") if f)
        elif o == "rot" or o.startswith("rot="):
            try:
                rotation = int(o[4:]) if "=" in o else ROTATION_SEED
            except ValueError:
                raise TabshardError(f"bad scheme {scheme!r}: rotation seed must be an integer") from None
        elif o == "had" or o.startswith("had="):
            try:
                ffn_rotation = int(o[4:]) if "=" in o else ROTATION_SEED
            except ValueError:
                raise TabshardError(f"bad scheme {scheme!r}: FFN rotation seed must be an integer") from None
        elif o == "seq":
            sequential = True
        elif o.startswith("damp="):
            try:
                damp = float(o[5:])
            except ValueError:
                damp = -1.0
            if not 0 < damp < 100:
                raise TabshardError(f"bad scheme {scheme!r}: damp=D needs a positive number, got {o[5:]!r}")
        elif o.startswith("calib="):
            if not o[6:].isdigit() or int(o[6:]) < 2 or linears.startswith("mixed@"):
                raise TabshardError(f"bad scheme {scheme!r}: calib=N needs a token count, on a uniform scheme")
            calib = int(o[6:])
        else:
            raise TabshardError(f"bad scheme {scheme!r}: after '+' expected rot, rot=SEED, had, had=SEED, seq, damp=D, calib=N, emb=CHOICE "
                                f"or (mixed) fmt=A/B/..., got {o!r}")
    try:
        for c in ([] if linears.startswith("mixed@") else [linears]) + [emb] + list(formats or ()):
            if c != SOURCE and parse_choice(c)[0] not in ("rtn", "clip", "gptq", "hqq"):
                raise ValueError(f"unknown method in {c!r}")
        if linears.startswith("mixed@"):
            float(linears[6:])
    except (ValueError, IndexError) as exc:
        raise TabshardError(f"bad scheme {scheme!r}: {exc}") from None
    if sequential and (linears == SOURCE or (not linears.startswith("mixed@") and parse_choice(linears)[0] != "gptq")):
        raise TabshardError(f"bad scheme {scheme!r}: +seq is sequential GPTQ; the linears here are not GPTQ")
    return Scheme(linears, emb, rotation, sequential, formats, ffn_rotation, damp, calib)


def scheme_plan(cal, scheme: Scheme, alphas_fn, formats=None) -> dict:
    formats = scheme.formats or formats
    from tabshard.mixed_precision import MIXED_FORMATS, mixed_plan, uniform_plan

    if scheme.linears.startswith("mixed@"):
        return mixed_plan(cal, alphas_fn(), bits_per_weight=float(scheme.linears[6:]), embedding=scheme.embedding,
                          formats=tuple(formats or MIXED_FORMATS))
    return uniform_plan(cal.config.n_layers, scheme.linears, scheme.embedding)


def needed_choices(cal, scheme: Scheme, formats=None) -> set:
    """(tensor, choice) pairs that scheme's plan may draw on from the independent cache."""
    from tabshard import calibration as C
    from tabshard import mixed_precision as M

    formats = scheme.formats or formats
    linears = [n for n in cal.tensor_names() if n.startswith("blk.")]
    pairs = set()
    if scheme.linears.startswith("mixed@"):
        formats = tuple(formats or M.MIXED_FORMATS)
        pairs |= {(n, c) for n in linears for c in formats + tuple(M.scored(f) for f in formats) + M.probes_for(formats)}
        pairs.add((C.EMBEDDING, M.EMBEDDING_PROBE))
    elif scheme.linears != C.SOURCE and not scheme.sequential:
        pairs |= {(n, scheme.linears) for n in linears}
    if cal.rotated:
        pairs |= {(n, C.ROTATED_SOURCE) for n in cal.tensor_names()}
    pairs |= {(n, C.ROTATED_SOURCE) for n in cal.tensor_names() if cal.ffn_rotated(n)}
    if scheme.embedding != C.SOURCE:
        pairs |= {(n, scheme.embedding) for n in (C.EMBEDDING, C.HEAD) if n in cal.tensor_names()}
    return {(n, c) for n, c in pairs if c != C.SOURCE}


def run_report(source, eval_sets: dict, calib_ids, prompt_ids, schemes, *, sens_ids=None, gen_tokens: int = 24,
               log=None, cache_dir: str | None = None, window: int | None = None, mixed_formats=None,
               workers: int = 1, more_calib: dict | None = None) -> list[dict]:
    """One row per scheme: bits/weight (linears), bytes (whole model), perplexity per evaluation
    domain and its ratio to the source's, the worst ratio, agreement, seconds to quantize.
    ``source`` is ModelWeights; ``eval_sets`` {domain: ids}; ``sens_ids`` (text held out from
    the Hessians) scores mixed precision, default the first 512 calibration ids. ``more_calib``
    {tokens: ids}: the calibration ids of schemes with ``+calib=N``."""
    from tabshard import calibration as C
    from tabshard import mixed_precision as M

    log = log or (lambda msg: None)
    window = window or C.WINDOW
    sens_ids = list(sens_ids) if sens_ids is not None else list(calib_ids[:512])
    cals: dict = {}
    costs: dict = {}

    def calibrator(basis):
        if basis not in cals:
            t0 = time.perf_counter()
            rotation, ffn_rotation, damp, n = basis
            ids = calib_ids if n is None else (more_calib or {})[n]
            cals[basis] = C.Calibrator(source, ids, window=window, cache_dir=cache_dir, rotation=rotation,
                                       ffn_rotation=ffn_rotation, damp=damp)
            log(f"calibration{'' if rotation is None else f' (rotation seed {rotation})'}"
                f"{'' if ffn_rotation is None else f' (FFN rotation seed {ffn_rotation})'}: {len(ids)} tokens, "
                f"Hessians in {time.perf_counter() - t0:.1f}s")
        return cals[basis]

    if workers > 1 and cache_dir:
        t0 = time.perf_counter()
        for basis in dict.fromkeys(parse_scheme(s).basis for s in schemes):
            cal = calibrator(basis)
            cal.quantize_many(set().union(*(needed_choices(cal, parse_scheme(s), mixed_formats) for s in schemes
                                            if parse_scheme(s).basis == basis)), workers)
        log(f"quantized in {workers} processes in {time.perf_counter() - t0:.1f}s")
    src_dense = C.DenseModel(source)
    targets = [src_dense.greedy(p, gen_tokens) for p in prompt_ids]
    rows = []
    for text in schemes:
        scheme = parse_scheme(text)
        cal = calibrator(scheme.basis)

        def alphas(cal=cal, rotation=scheme.basis, formats=scheme.formats or mixed_formats or M.MIXED_FORMATS):
            probes = M.probes_for(formats)
            have = costs.get(rotation)
            if have is None or not set(probes) <= set(have.probes):
                t = time.perf_counter()
                probes = tuple(sorted(set(probes) | set(have.probes if have else ())))
                costs[rotation] = M.estimated_costs(cal, sens_ids, probes)
                log(f"sensitivity probes in {time.perf_counter() - t:.1f}s (delta NLL per token): {costs[rotation].summary()}")
            return costs[rotation]

        if text == C.SOURCE:
            plan, w, dense = {}, source, src_dense
        else:
            plan = scheme_plan(cal, scheme, alphas, mixed_formats)
            w = cal.assemble(plan, scheme.sequential)
            dense = cal.dense_of(plan, scheme.sequential)
        # per window (mean NLL per token): two schemes compared window by window on the same
        # tokens give the spread of their difference, which one perplexity per domain hides
        by_window = {d: [dense.nll([w]) for w in C.windows(ids, window)] for d, ids in eval_sets.items()}
        ppl = {d: round(math.exp(sum(t for t, _ in v) / max(sum(n for _, n in v), 1)), 4) for d, v in by_window.items()}
        agree = sum(dense.agreement(p, tg) for p, tg in zip(prompt_ids, targets)) / max(len(prompt_ids), 1)
        row = {
            "scheme": text,
            "bits_per_weight": round(C.linear_bits_per_weight(w), 4),
            "bytes": C.model_bytes(w),
            "embedding_bytes": w.embedding.nbytes + (0 if w.head.output is w.embedding else w.head.output.nbytes),
            "perplexity": ppl,
            "agreement": round(agree, 4),
            "quantize_s": round(_scheme_seconds(cal, plan, scheme.sequential), 2) if plan else 0.0,
            "formats": sorted(set(plan.values())) if plan else ["source"],
            "window_nll": {d: [round(t / n, 5) for t, n in v] for d, v in by_window.items()},
        }
        if scheme.linears.startswith("mixed@"):
            from collections import Counter

            row["plan_summary"] = {t: dict(Counter(plan[f"blk.{i}.{t}"] for i in range(cal.config.n_layers))) for t in C.LINEAR_TYPES}
            row["predicted_delta_nll"] = round(sum(alphas().cost(cal, n, c) for n, c in plan.items()), 4)
        rows.append(row)
        log(f"{text:36s} {row['bits_per_weight']:6.3f} bpw {row['bytes'] / 1e6:7.2f} MB ppl "
            + " ".join(f"{d} {v:.3f}" for d, v in ppl.items()) + f" agree {agree:.3f} quantize {row['quantize_s']:.1f}s")
    src = next((r for r in rows if r["scheme"] == "source"), None)
    for r in rows:
        if src:
            r["ppl_ratio"] = {d: round(r["perplexity"][d] / src["perplexity"][d], 4) for d in r["perplexity"]}
            r["worst_ratio"] = max(r["ppl_ratio"].values())
    return rows


def history_figures(rows: list[dict]) -> list:
    """The rows as benchmark-history figures (tabshard/bench_history.py): per scheme, each held-out
    domain's perplexity ratio to the source, the worst of them, and bits/weight on the linears."""
    from tabshard.bench_history import Figure

    out = []
    for r in rows:
        if r["scheme"] == "source" or "ppl_ratio" not in r:
            continue
        key = f"quant.{r['scheme']}"
        out += [Figure(f"{key}.{d}.ppl_ratio", v, "x", "lower") for d, v in r["ppl_ratio"].items()]
        out += [Figure(f"{key}.worst_ratio", r["worst_ratio"], "x", "lower"),
                Figure(f"{key}.bits_per_weight", r["bits_per_weight"], "bpw", "lower")]
    return out


def geomean_perplexity(row: dict) -> float:
    v = list(row["perplexity"].values())
    return math.exp(sum(math.log(x) for x in v) / len(v))


def _scheme_seconds(cal, plan: dict, sequential: bool = False) -> float:
    """Seconds this plan's quantization takes from scratch: the sequential pass as timed, else
    per-choice totals apportioned by how many of each choice's cached tensors the plan uses."""
    if sequential:
        return cal.seconds.get(f"sequential:{cal.plan_key(plan)}", 0.0)
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
        y = r.get("worst_ratio", geomean_perplexity(r))
        ax.scatter(r["bytes"] / 1e6, y, marker=marker, s=60)
        ax.annotate(r["scheme"], (r["bytes"] / 1e6, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("model bytes (MB)")
    ax.set_ylabel("worst perplexity / source over held-out domains (log)")
    ax.set_title("tabshard quant-report: held-out perplexity ratio vs bytes")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict], classes: dict | None = None) -> str:
    domains = list(rows[0]["perplexity"]) if rows else []
    head = "| " + ("class | " if classes else "") + "scheme | bits/weight (linears) | bytes | " + \
        " | ".join(f"{d} ppl (× source)" for d in domains) + " | worst × | agreement | quantize s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    cls = {v: k for k, v in (classes or {}).items()}
    for r in rows:
        ratio = r.get("ppl_ratio", {})
        cells = " | ".join(f"{r['perplexity'][d]:.2f} ({ratio.get(d, float('nan')):.2f})" for d in domains)
        lines.append("| " + (f"{cls.get(r['scheme'], '')} | " if classes else "") +
                     f"{r['scheme']} | {r['bits_per_weight']:.3f} | {r['bytes']:,} | {cells} | "
                     f"{r.get('worst_ratio', float('nan')):.2f} | {r['agreement']:.3f} | {r['quantize_s']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ commands


def _load(a):
    from tabshard.calibration import limit_blas_threads
    from tabshard.models import open_model
    from model.tokenizer import GGUFTokenizer

    if a.threads:
        limit_blas_threads(a.threads)
    model = open_model(a.model)
    return model, GGUFTokenizer(model), model.load_all()


def _domains(arg: str | None, default):
    return default if arg is None else tuple(d for d in arg.split(",") if d)


def _mixed_text(a, tok, calib_tokens: int | None = None):
    from tabshard import calibration_text as T

    try:
        if a.texts and getattr(a, "selection", None):
            raise ValueError("give --texts or --selection, not both (the saved ids say what they evaluate)")
        if a.texts and calib_tokens:
            raise ValueError(f"+calib={calib_tokens} builds its calibration by the recipe: give no --texts")
        if a.texts:
            m = T.MixedText.load(a.texts)
            if not hasattr(a, "eval_domains"):
                m.eval = {}
            elif a.eval_domains is not None:
                m.eval = {d: v for d, v in m.eval.items() if d in _domains(a.eval_domains, ())}
            return m
        return T.build(tok, calib_tokens=calib_tokens or a.calib_tokens, sens_tokens=a.sens_tokens,
                       eval_tokens=getattr(a, "tokens", 2048), seed=a.seed,
                       calibration=_domains(a.calib_domains, T.CALIBRATION_DOMAINS),
                       # quantize evaluates nothing: no held-out domain to build
                       heldout=_domains(a.eval_domains, T.HELDOUT_DOMAINS) if hasattr(a, "eval_domains") else (),
                       cache_dir=a.cache, selection=_selection(getattr(a, "selection", None)))
    except ValueError as exc:
        raise TabshardError(str(exc)) from None


def _selection(arg: str | None):
    """--selection START:N -> (START, N)."""
    if arg is None:
        return None
    try:
        start, n = (int(x) for x in arg.split(":"))
    except ValueError:
        raise TabshardError(f"bad --selection {arg!r}: expected START:N, e.g. 4352:4096") from None
    if start < 0 or n < 2:
        raise TabshardError(f"bad --selection {arg!r}: START >= 0 and N >= 2")
    return start, n


def _mixed_formats(a):
    """--mixed-formats A,B,...: the formats mixed@B chooses among (default MIXED_FORMATS)."""
    from tabshard.calibration import SOURCE, parse_choice

    if not a.mixed_formats:
        return None
    out = tuple(f for f in a.mixed_formats.split(",") if f)
    try:
        for f in out:
            if f != SOURCE and parse_choice(f)[0] != "gptq":
                raise ValueError(f"{f!r} is not a GPTQ format")
    except ValueError as exc:
        raise TabshardError(f"bad --mixed-formats: {exc}") from None
    return out


def cmd_quant_report(a) -> int:
    if a.quick and a.scheme:
        raise TabshardError("give --quick or --scheme, not both")
    model, tok, weights = _load(a)
    mixed = _mixed_text(a, tok)
    eval_sets = dict(mixed.eval)
    if a.text:
        try:
            text = open(a.text, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise TabshardError(f"cannot read --text {a.text}: {exc}") from None
        ids = tok.encode(text)[: a.tokens]
        if len(ids) < 2:
            raise TabshardError(f"--text {a.text} has fewer than 2 tokens")
        eval_sets[f"text:{a.text}"] = ids
    if not eval_sets:
        raise TabshardError("no held-out domain has text on this machine; give --text PATH")
    schemes = list(QUICK.values()) if a.quick else (a.scheme or list(DEFAULT_SCHEMES))
    for s in schemes:
        parse_scheme(s)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if (a.json or a.verbose) else (lambda m: None)
    log(mixed.describe())
    if a.save_texts:
        mixed.save(a.save_texts)
    # +calib=N schemes: the same recipe with N calibration tokens
    more_calib = {n: _mixed_text(a, tok, n).calib_ids for n in {parse_scheme(s).calib_tokens for s in schemes} - {None}}
    rows = run_report(weights, eval_sets, mixed.calib_ids, [tok.encode(p) for p in PROMPTS], schemes,
                      sens_ids=mixed.sens_ids, log=log, cache_dir=a.cache, mixed_formats=_mixed_formats(a),
                      workers=a.workers, more_calib=more_calib)
    if a.plot:
        plot(rows, a.plot)
    if a.history:
        from tabshard.bench_history import append_figures

        with _stdout_to_stderr():
            append_figures(history_figures(rows), suite="quant-report")
    if a.json:
        print(json.dumps({"text": mixed.describe(), "rows": rows}, indent=1))
    else:
        print(mixed.describe())
        print(format_table(rows, QUICK if a.quick else None))
    return 0


def _stdout_to_stderr():
    """The history's one-line summary must not interleave with --json on stdout."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr)


def cmd_quantize(a) -> int:
    from tabshard.precision import PrecisionError, fit_tabs
    from tabshard import calibration as C
    from tabshard import mixed_precision as M
    from tabshard import qmodel

    given = [x is not None for x in (a.budget_bytes, a.bits_per_weight, a.scheme, a.tab_budgets)]
    if sum(given) != 1:
        raise TabshardError("give exactly one of --budget-bytes, --bits-per-weight, --scheme, --tab-budgets")
    if not a.out.endswith(".tsq"):
        raise TabshardError(f"--out must end in .tsq, got {a.out!r}")
    scheme = parse_scheme(a.scheme) if a.scheme else None
    rotation = scheme.rotation if scheme else (a.rotate if a.rotate is not None else None)
    ffn_rotation = scheme.ffn_rotation if scheme else None
    sequential = scheme.sequential if scheme else a.sequential
    model, tok, weights = _load(a)
    mixed = _mixed_text(a, tok, scheme.calib_tokens if scheme else None)
    t0 = time.perf_counter()
    cal = C.Calibrator(weights, mixed.calib_ids, cache_dir=a.cache, rotation=rotation, ffn_rotation=ffn_rotation,
                       damp=scheme.damp if scheme else None)
    emb = a.embedding
    report: dict = {"calibration_tokens": len(mixed.calib_ids), "calibration": mixed.describe(),
                    "sequential": bool(sequential)}
    try:
        if scheme:
            plan = scheme_plan(cal, scheme, lambda: M.estimated_costs(cal, mixed.sens_ids))
            if emb:
                plan[C.EMBEDDING] = emb
        else:
            alphas = M.estimated_costs(cal, mixed.sens_ids)
            report["sensitivity_delta_nll"] = alphas.summary()
            if a.bits_per_weight is not None:
                plan = M.mixed_plan(cal, alphas, bits_per_weight=a.bits_per_weight, embedding=emb or C.SOURCE)
            elif a.budget_bytes is not None:
                plan = M.mixed_plan(cal, alphas, budget_bytes=a.budget_bytes, embedding=emb)
            else:
                budgets = [int(x) for x in a.tab_budgets.split(",")]
                opts = M.tensor_options(cal, alphas, embedding_fixed=emb)
                layer_of = {n: (None if n in (C.EMBEDDING, C.HEAD) else int(n.split(".")[1])) for n in opts}
                norms = weights.layers[0].attn_norm.nbytes * 2
                tp = fit_tabs(opts, layer_of, budgets, fixed_layer_bytes=norms, head_fixed_bytes=weights.head.output_norm.nbytes)
                plan = tp.plan
                report["tabs"] = [{"layers": list(r), "bytes": b, "budget": bud} for r, b, bud in zip(tp.ranges, tp.tab_bytes, budgets)]
    except PrecisionError as exc:
        raise TabshardError(str(exc)) from None
    w = cal.assemble(plan, sequential)
    plan = {n: cal._choice(plan, n) + ("+seq" if sequential and n.startswith("blk.") and "gptq" in cal._choice(plan, n) else "")
            for n in cal.tensor_names()}
    report.update(bits_per_weight=C.linear_bits_per_weight(w), bytes=C.model_bytes(w), seconds=time.perf_counter() - t0)
    rot = None if rotation is None and ffn_rotation is None else qmodel.Rotation.of(rotation, cal.config, ffn_rotation)
    size = qmodel.write(a.out, w, qmodel.source_fields(model), plan, report, rotation=rot)
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
        p.add_argument("--calib-tokens", type=int, default=6144, help="calibration tokens (Hessians), split evenly across the calibration domains")
        p.add_argument("--sens-tokens", type=int, default=768, help="calibration-domain tokens held out from the Hessians that score mixed precision")
        p.add_argument("--calib-domains", metavar="A,B,...", help="calibration domains (default: python-docs,docstrings,changelogs; see tabshard/calibration_text.py)")
        p.add_argument("--seed", type=int, default=22, help="the calibration recipe's seed (which documents, in what order)")
        p.add_argument("--texts", metavar="FILE.json", help="token ids saved by quant-report --save-texts (instead of building them here)")
        p.add_argument("--cache", metavar="DIR", help="keep token ids and quantized tensors here, keyed by model and calibration text, to reuse across runs")
        p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1: OpenBLAS busy-waits on a shared host; 0 leaves it)")

    q = sub.add_parser("quantize", help="requantize a model to fit a memory budget (writes a .tsq)")
    common(q)
    q.add_argument("--out", required=True, metavar="PATH.tsq")
    q.add_argument("--budget-bytes", type=int, help="whole-model budget; per-tensor formats chosen at least measured cost")
    q.add_argument("--bits-per-weight", type=float, help="budget for the linear layers, in bits per weight including scales")
    q.add_argument("--tab-budgets", metavar="B1,B2,...", help="bytes each tab can hold: choose formats so contiguous layer ranges fit")
    q.add_argument("--scheme", help="one scheme, e.g. gptq:s3g32+rot+seq (see quant-report)")
    q.add_argument("--embedding", help="embedding/LM head choice, e.g. clip:s4g32 or source (default: chosen within --budget-bytes, else source)")
    q.add_argument("--rotate", type=int, nargs="?", const=ROTATION_SEED, metavar="SEED",
                   help="quantize in a rotated residual basis (folded into the weights; seed 22 if none given)")
    q.add_argument("--sequential", action="store_true", help="sequential GPTQ (each layer on the quantized layers' outputs)")
    q.set_defaults(func=cmd_quantize)

    r = sub.add_parser("quant-report", help="perplexity, size and agreement of quantization schemes")
    common(r)
    r.add_argument("--eval-domains", metavar="A,B,...", help="held-out evaluation domains (default: licenses,man-pages,readmes)")
    r.add_argument("--selection", metavar="START:N",
                   help="evaluate on each calibration domain's tokens START..START+N (after its calibration and "
                        "sensitivity tokens) instead of the held-out domains: where schemes are chosen")
    r.add_argument("--text", metavar="PATH", help="also evaluate on this UTF-8 file")
    r.add_argument("--save-texts", metavar="FILE.json", help="save the calibration and evaluation token ids (for --texts on another machine)")
    r.add_argument("--tokens", type=int, default=2048, help="evaluation tokens per domain (512-token windows)")
    r.add_argument("--scheme", action="append", help="a scheme to report (repeatable; default: the full table)")
    r.add_argument("--mixed-formats", metavar="A,B,...", help="formats mixed@B chooses among, e.g. gptq:a2g64,gptq:s3g64,gptq:s4g64,source")
    r.add_argument("--workers", type=int, default=1, help="processes that quantize the tensors (with --cache): each tensor is independent")
    r.add_argument("--quick", action="store_true", help="only the recommended scheme of each class (source, 4-bit, <=4.0, <=3.0, <=2.5 bpw)")
    r.add_argument("--json", action="store_true", help="print the rows as JSON")
    r.add_argument("--plot", metavar="OUT.png", help="write the worst held-out ratio vs bytes")
    r.add_argument("--history", action="store_true", help="append each row's ratios to the benchmark history (needs the source row)")
    r.add_argument("--verbose", action="store_true", help="progress on stderr")
    r.set_defaults(func=cmd_quant_report)
