"""Precision planning: which quantized format each tensor gets so the model fits a budget at the
least measured cost. Pure functions over numbers; measuring the costs is tabshard/calibration.py's
job, writing the file tabshard/qmodel.py's.

The model: every tensor has options (a format choice, its packed bytes, its estimated cost =
increase in mean NLL per token); costs add across tensors. ``choose`` solves the resulting
multiple-choice knapsack by Lagrangian relaxation (each tensor takes argmin cost + lam * bytes;
lam bisected to the smallest value that fits) and then spends what is left on the upgrades with
the best cost saved per byte. ``fit_tabs`` does the same for a set of tabs, each holding a
contiguous range of layers (the last one also the head), and checks that the plan packs.

>>> opts = {"a": [Option("lo", 10, 1.0), Option("hi", 20, 0.0)], "b": [Option("lo", 10, 5.0), Option("hi", 20, 0.0)]}
>>> choose(opts, 30)
{'a': 'lo', 'b': 'hi'}
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    choice: str  # e.g. "gptq:s3g32" or "source"
    nbytes: int
    cost: float  # estimated increase in mean NLL per token


class PrecisionError(Exception):
    """No choice of formats fits the budget."""


def _pick(options: dict[str, list[Option]], lam: float) -> dict[str, Option]:
    return {n: min(opts, key=lambda o: (o.cost + lam * o.nbytes, o.nbytes)) for n, opts in options.items()}


def choose(options: dict[str, list[Option]], budget_bytes: int, fixed_bytes: int = 0) -> dict[str, str]:
    """{tensor: choice} with sum of bytes + fixed_bytes <= budget_bytes, least total cost."""
    if not options:
        return {}
    room = budget_bytes - fixed_bytes
    smallest = sum(min(o.nbytes for o in opts) for opts in options.values())
    if smallest > room:
        raise PrecisionError(f"the smallest formats need {smallest + fixed_bytes} bytes; the budget is {budget_bytes}")

    def total(sel):
        return sum(o.nbytes for o in sel.values())

    lo, hi = 0.0, 1.0
    while total(_pick(options, hi)) > room:
        hi *= 4
        if hi > 1e30:
            break
    if total(_pick(options, 0.0)) <= room:
        sel = _pick(options, 0.0)
    else:
        for _ in range(100):
            mid = (lo + hi) / 2
            if total(_pick(options, mid)) <= room:
                hi = mid
            else:
                lo = mid
        sel = _pick(options, hi)
    if total(sel) > room:  # lam too large to resolve: fall back to the smallest of each
        sel = {n: min(opts, key=lambda o: (o.nbytes, o.cost)) for n, opts in options.items()}
    # greedy fill: best cost saved per extra byte, while it fits
    left = room - total(sel)
    while True:
        best, best_rate = None, 0.0
        for n, opts in options.items():
            cur = sel[n]
            for o in opts:
                extra = o.nbytes - cur.nbytes
                gain = cur.cost - o.cost
                if gain > 0 and extra <= left:
                    rate = gain / max(extra, 1)
                    if rate > best_rate:
                        best, best_rate = (n, o), rate
        if best is None:
            break
        n, o = best
        left -= o.nbytes - sel[n].nbytes
        sel[n] = o
    return {n: o.choice for n, o in sel.items()}


def plan_cost(options: dict[str, list[Option]], plan: dict[str, str]) -> tuple[int, float]:
    """(bytes, estimated cost) of a plan."""
    by = {n: {o.choice: o for o in opts} for n, opts in options.items()}
    picked = [by[n][c] for n, c in plan.items()]
    return sum(o.nbytes for o in picked), sum(o.cost for o in picked)


@dataclass(frozen=True)
class TabPlan:
    plan: dict  # tensor -> choice
    ranges: list  # per tab: (layer_start, layer_end) — the last tab also holds the head
    tab_bytes: list  # bytes each tab holds


def _pack(layer_bytes: list[int], head_bytes: int, budgets: list[int]):
    """Contiguous layers to tabs in order, first fit; None if they do not fit."""
    ranges, used, start, tab = [], [], 0, 0
    cur = 0
    for i, b in enumerate(layer_bytes):
        while tab < len(budgets) and cur + b + (head_bytes if i == len(layer_bytes) - 1 else 0) > budgets[tab]:
            if cur == 0 and tab < len(budgets):
                tab += 1  # this tab cannot hold even one more layer: skip it (holds nothing)
                ranges.append((start, start))
                used.append(0)
                continue
            ranges.append((start, i))
            used.append(cur)
            start, cur, tab = i, 0, tab + 1
        if tab >= len(budgets):
            return None
        cur += b
    ranges.append((start, len(layer_bytes)))
    used.append(cur + head_bytes)
    ranges += [(len(layer_bytes), len(layer_bytes))] * (len(budgets) - len(ranges))
    used += [0] * (len(budgets) - len(used))
    return ranges, used


def fit_tabs(options: dict[str, list[Option]], layer_of: dict[str, int | None], tab_budgets: list[int],
             fixed_layer_bytes: int = 0, head_fixed_bytes: int = 0, steps: int = 40) -> TabPlan:
    """Precision for the tabs that exist: tab i holds at most tab_budgets[i] bytes of packed
    weights; layers go to tabs in order, contiguous, the head (layer_of None) with the last
    layer. ``fixed_layer_bytes`` per layer (norms) and ``head_fixed_bytes`` are not choosable.
    Starts from the pooled budget and tightens it until the plan packs."""
    n_layers = 1 + max((v for v in layer_of.values() if v is not None), default=-1)
    total = sum(tab_budgets) - n_layers * fixed_layer_bytes - head_fixed_bytes
    budget = total
    by = {n: {o.choice: o for o in opts} for n, opts in options.items()}
    for _ in range(steps):
        try:
            plan = choose(options, budget)
        except PrecisionError:
            break
        layer_bytes = [fixed_layer_bytes] * n_layers
        head = head_fixed_bytes
        for n, c in plan.items():
            if layer_of[n] is None:
                head += by[n][c].nbytes
            else:
                layer_bytes[layer_of[n]] += by[n][c].nbytes
        packed = _pack(layer_bytes, head, list(tab_budgets))
        if packed is not None:
            return TabPlan(plan, packed[0], packed[1])
        budget = int(budget * 0.97)
    raise PrecisionError(f"{len(tab_budgets)} tab(s) with {sum(tab_budgets)} bytes cannot hold the model at any precision on offer")
