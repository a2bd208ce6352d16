"""Markdown tables of benchmark results. Every row names the card it ran on; ratios are taken against baseline rows of
the same run (PEFT eager, PEFT compiled), and DoRA rows against the LoRA row of the same library and compile mode."""

from __future__ import annotations

from typing import Optional

from _timing import Result, flops_per_token


def fmt(x: float, spec: str) -> str:
    return "—" if x != x else format(x, spec)


def _ok(r: Optional[Result]) -> bool:
    return r is not None and r.tokens_per_s == r.tokens_per_s


def _find(results: list[Result], name: str) -> Optional[Result]:
    return next((r for r in results if r.variant.name == name and _ok(r)), None)


def _lora_twin(results: list[Result], r: Result) -> Optional[Result]:
    v = r.variant
    return next((o for o in results if _ok(o) and o.variant.method == "lora" and o.variant.lib == v.lib
                 and o.variant.compile == v.compile and o.variant.warm == v.warm and not o.variant.fused_ce
                 and not o.variant.sac and o.variant.bf16_adapters == v.bf16_adapters), None)


def ratio(a: float, b: Optional[Result], attr: str = "tokens_per_s") -> str:
    return fmt(a / getattr(b, attr), ".2f") + "x" if _ok(b) else "—"


def training_table(results: list[Result], config, args, peak_tflops: Optional[float]) -> str:
    peft_eager, peft_compiled = _find(results, "PEFT eager"), _find(results, "PEFT compile")
    lines = ["| variant | device | trainable dtype | tokens/s | vs PEFT eager | vs PEFT compile | step ms (median, "
             "spread) | peak GiB (vs PEFT compile) | first step s (setup s) | final loss | notes |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        v = r.variant
        dtype = r.dtypes or "—"
        if v.lib == "peft" and r.dtypes:
            dtype += f" ({r.dtypes} matmuls)"
        elif v.lib == "ours" and r.dtypes:
            dtype += " (bf16 matmuls)"
        elif v.lib == "full":
            dtype = f"{r.dtypes} (all weights)" if r.dtypes else "—"
        notes = [r.note] if r.note else []
        if v.compile:
            notes.append(f"{r.graph_breaks} graph breaks, {r.graphs} graphs")
        if v.method == "dora":
            twin = _lora_twin(results, r)
            if twin is not None and _ok(r):
                notes.append(f"vs LoRA same mode: time {twin.tokens_per_s / r.tokens_per_s:.2f}x, "
                             f"memory {r.peak_gib / twin.peak_gib:.2f}x")
        if peak_tflops and _ok(r):
            roof = peak_tflops * 1e12 / flops_per_token(config, args.seq, v.lib, args.r)
            notes.append(f"{100 * r.tokens_per_s / roof:.0f}% of {roof / 1e3:.0f}k roofline")
        for key, value in r.extra.items():
            notes.append(f"{key}={value}")
        memory = fmt(r.peak_gib, ".1f") + (f" ({ratio(r.peak_gib, peft_compiled, 'peak_gib')})" if _ok(r) else "")
        lines.append(f"| {v.name} | {r.device or '—'} | {dtype} | {fmt(r.tokens_per_s / 1e3, '.1f')}k | "
                     f"{ratio(r.tokens_per_s, peft_eager)} | {ratio(r.tokens_per_s, peft_compiled)} | "
                     f"{fmt(r.step_ms, '.1f')} ({fmt(r.spread_ms, '.1f')}) | {memory} | "
                     f"{fmt(r.first_step_s, '.1f')} ({fmt(r.setup_s, '.1f')}) | {fmt(r.loss, '.4f')} | "
                     f"{'; '.join(notes)} |")
    return "\n".join(lines)
