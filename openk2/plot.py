"""`openk2 plot RUN_DIR... --out FILE.png`: training curves of one or more runs side by side.

Panels: loss vs tokens, loss vs wall-clock, max attention logit (with the QK-Clip threshold), learning
rate, expert-load imbalance (coefficient of variation), and the last run's per-expert load over
steps (share of tokens, one row per MoE layer's experts). matplotlib is imported here, lazily, on
the Agg backend, so plotting works without a display and costs nothing elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a training run directory)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not valid JSON") from None
    if not rows:
        raise ValueError(f"{path}: no steps logged yet")
    return rows


def _tau(run_dir: Path) -> float | None:
    try:
        opts = json.loads((run_dir / "run.json").read_text())["options"]
        return opts["qk_clip_tau"] if opts.get("optimizer") == "muonclip" else None
    except (OSError, ValueError, KeyError):
        return None


def plot_runs(run_dirs, out: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    from openk2.rl_plot import is_rl_run, plot_rl
    kinds = {is_rl_run(rows) for _, rows in runs}
    if kinds == {True}:   # RL runs (openk2 rl) have their own curves
        plt.close("all")
        return plot_rl(run_dirs, out)
    if len(kinds) > 1:
        raise ValueError("plot either training runs or RL runs, not both in one figure")
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (ax_tok, ax_time, ax_logit), (ax_lr, ax_cv, ax_load) = axes
    for d, rows in runs:
        label = d.name or str(d)
        steps = [r["step"] for r in rows]
        loss = [r["loss"] for r in rows]
        ax_tok.plot([r["tokens"] for r in rows], loss, label=label)
        ax_time.plot([r.get("elapsed_s", 0.0) for r in rows], loss, label=label)
        logits = [r.get("max_logit", float("nan")) for r in rows]
        line, = ax_logit.plot(steps, logits, label=label)
        tau = _tau(d)
        if tau is not None and max(logits) >= tau / 2:  # else the line would flatten the curves
            ax_logit.axhline(tau, color=line.get_color(), ls=":", lw=1)
        ax_lr.plot(steps, [r["lr"] for r in rows], label=label)
        ax_cv.plot(steps, [r.get("expert_load_cv", float("nan")) for r in rows], label=label)
    for ax, title, xlabel in ((ax_tok, "loss", "tokens"), (ax_time, "loss", "wall-clock s"),
                              (ax_logit, "max attention logit (dotted: QK-Clip tau)", "step"),
                              (ax_lr, "learning rate", "step"), (ax_cv, "expert load CV (std/mean)", "step")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in (ax_tok, ax_time):
        ax.set_yscale("log")
    d, rows = runs[-1]
    loads = [r.get("expert_load") or [] for r in rows]
    if loads and loads[-1]:
        share = np.array([[x / max(sum(layer), 1) for layer in ld for x in layer] for ld in loads if ld]).T
        im = ax_load.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis",
                            extent=(rows[0]["step"], rows[-1]["step"], share.shape[0], 0))
        per_layer = len(loads[-1][0])
        for k in range(1, len(loads[-1])):
            ax_load.axhline(k * per_layer, color="w", lw=0.5)
        fig.colorbar(im, ax=ax_load, label="share of the layer's tokens")
        ax_load.set_title(f"per-expert load, {d.name} (rows: experts, by MoE layer)")
        ax_load.set_xlabel("step")
    else:
        ax_load.set_axis_off()
        ax_load.set_title("no MoE layers")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
