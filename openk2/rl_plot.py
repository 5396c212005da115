"""Curves of RL runs (`openk2 rl` writes OUT/rl.png; `openk2 plot RL_RUN_DIR` draws the same).

Panels: reward (mean over the step's samples) and accuracy per family; mean generated tokens per
family (where a budget binds, this is what should fall) with truncations; drift from the start
policy (token-level KL estimate, and relative weight change); the loss terms; the rollout
temperature and learning rate; rollout and training throughput. Noisy per-step values are drawn
thin with a running mean over `smooth` steps on top.
"""

from __future__ import annotations

from pathlib import Path


def is_rl_run(rows: list[dict]) -> bool:
    return bool(rows) and "reward" in rows[0] and "families" in rows[0]


def _smooth(xs, k):
    out, acc = [], []
    for x in xs:
        acc.append(x)
        acc = acc[-k:]
        vals = [v for v in acc if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def plot_rl(run_dirs, out: str | Path, smooth: int = 5) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openk2.plot import read_metrics
    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (ax_r, ax_tok, ax_drift), (ax_loss, ax_temp, ax_speed) = axes
    ax_trunc, ax_w, ax_lr = ax_tok.twinx(), ax_drift.twinx(), ax_temp.twinx()
    ax_trunc.set_ylabel("truncated runs per step (bars)")
    ax_w.set_ylabel("relative weight change (dotted)")
    ax_lr.set_ylabel("learning rate (dotted)")
    for d, rows in runs:
        tag = f"{d.name or d}: " if len(runs) > 1 else ""
        steps = [r["step"] for r in rows]

        def line(ax, ys, label, **kw):
            ys = [float("nan") if y is None else y for y in ys]
            base, = ax.plot(steps, ys, lw=0.6, alpha=0.35, **kw)
            ax.plot(steps, [float("nan") if y is None else y for y in _smooth(ys, smooth)], lw=1.6,
                    color=base.get_color(), label=label)
        line(ax_r, [r["reward"] for r in rows], f"{tag}reward")
        fams = sorted({f for r in rows for f in r.get("families", {})})
        for f in fams:
            get = [r["families"].get(f, {}) for r in rows]
            line(ax_r, [g.get("accuracy") if g.get("n") else None for g in get], f"{tag}{f} accuracy", ls="--")
            if any("rubric_score" in g for g in get):
                line(ax_r, [g.get("rubric_score") for g in get], f"{tag}{f} rubric score (check)", ls=":")
            line(ax_tok, [g.get("mean_tokens") if g.get("n") else None for g in get], f"{tag}{f}")
        ax_trunc.bar(steps, [r.get("truncations", 0) for r in rows], color="grey", alpha=0.25, width=1.0)
        line(ax_drift, [r.get("drift_kl") for r in rows], f"{tag}KL(pi || pi_start) per token")
        ax_w.plot(steps, [r.get("weight_drift") for r in rows], color="k", lw=1, ls=":")
        line(ax_loss, [r.get("rl_loss") for r in rows], f"{tag}K1.5 loss")
        line(ax_loss, [r.get("ptx_loss") for r in rows], f"{tag}PTX cross-entropy")
        ax_temp.plot(steps, [r.get("temperature") for r in rows], label=f"{tag}temperature")
        ax_lr.plot(steps, [r.get("lr") for r in rows], color="k", lw=1, ls=":")
        line(ax_speed, [r.get("rollout_tokens_per_s") for r in rows], f"{tag}rollout generated tok/s")
        line(ax_speed, [r.get("train_tokens_per_s") for r in rows], f"{tag}training tok/s")
    for ax, title in ((ax_r, "reward and accuracy (dashed) per family"),
                      (ax_tok, "mean generated tokens per trajectory"),
                      (ax_drift, "drift from the start policy"), (ax_loss, "loss terms"),
                      (ax_temp, "rollout temperature"), (ax_speed, "throughput")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.06, top=0.96, wspace=0.42, hspace=0.28)  # fixed: fast
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
