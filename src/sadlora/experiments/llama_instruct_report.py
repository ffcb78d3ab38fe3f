"""Markdown table of the instruction experiment (``llama_instruct.run_llama_instruct``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["render_report", "write_report"]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def render_report(results: dict) -> str:
    """Markdown: one row per model; forgetting relative to the student base before training."""
    models = results["models"]
    tasks = sorted({t for m in models.values() for t in m["exact_match_by_task"]})
    header = (["model", "response ppl", "exact match"] + [f"EM {t}" for t in tasks]
              + ["generic ppl", "ppl ratio vs base", "alignment"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in models.items():
        cells = [name, _fmt(m["response_perplexity"]), _fmt(m["exact_match"])]
        cells += [_fmt(m["exact_match_by_task"].get(t)) for t in tasks]
        cells += [_fmt(m["generic"]["perplexity"]), _fmt(m["forgetting"]["perplexity_ratio"]),
                  _fmt(m.get("mean_alignment"))]
        lines.append("| " + " | ".join(cells) + " |")
    config = results["config"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in results["stage_seconds"].items())
    return "\n".join([
        "# Instruction following: KD teacher -> layer-dropped LoRA student", "",
        f"Student base: `{config['base_model']}` keeping layers `{config['keep_layers']}`; "
        f"KD teacher `{config['kd_teacher']}` (fine-tuned on the task: "
        f"{config['finetune_kd_teacher']}); LoRA rank {config['lora_rank']} on "
        f"{', '.join(config['target_modules'])}. {config['train_per_task']} training / "
        f"{config['eval_per_task']} held-out instructions per task ({', '.join(config['tasks'])}).",
        "",
        "Response ppl: perplexity of the held-out responses (prompt tokens masked). Exact match: "
        "greedy answer equals `answer: ...` after normalisation. Generic ppl: perplexity of "
        f"{results['generic_text']['count']} {results['generic_text']['source']} (never "
        "trained on); ppl ratio = generic ppl / generic ppl of the student base before "
        "adaptation (> 1 means forgetting; a student base with dropped layers is itself damaged, "
        "so < 1 there means the adaptation also repaired generic text; the pretrained model is the "
        "`kd_teacher before fine-tuning` row when the teacher was fine-tuned). The stage times "
        "are those of the calls that ran each stage (a resumed call reuses finished stages). "
        "Alignment: mean over layers of (1/r) sum cos^2 of "
        "the principal angles between colspan(B) and the spectral target span(U_r).", "",
        *lines, "",
        f"Wall time {results['wall_time_s']:.0f} s ({stages}).", ""])


def write_report(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(results))
    return path
