"""Human-readable progress lines for training events (the trainer's `progress`
callback receives dicts; the CLI and the demo print what these return)."""

from __future__ import annotations

EPOCH_LINE = (
    "epoch {epoch}/{epochs}  ce {ce:.4f}  lasso {lasso:.4g}  acc {accuracy:.2%}  "
    "sparsity {sparsity:.1%}"
)


def step_line(event: dict, prefix: str = "") -> str | None:
    """A line at each quarter of an epoch's steps, None between them."""
    step, steps = event["step"], event["steps"]
    if step < steps and step % max(1, steps // 4) == 0:
        return (
            f"{prefix}epoch {event['epoch']}/{event['epochs']}  step {step}/{steps}  "
            f"loss {event['loss']:.4f}"
        )
    return None


def event_lines(event: dict) -> list[str]:
    """Lines for one trainer event: quarter-epoch steps, then one line per epoch
    followed by the monitor's advice as warnings."""
    if event.get("event") == "step":
        line = step_line(event)
        return [line] if line else []
    if event.get("event") == "resume":
        rho = f", ρ {event['rho']:.3g}" if event.get("rho") else ""
        return [f"resuming {event['path']} after epoch {event['epoch']}/{event['epochs']} "
                f"(step {event['step']}{rho})"]  # fmt: skip
    if event.get("event") != "epoch":
        return []
    line = EPOCH_LINE.format(**event)
    line += f"  lr {event['lr']:.3g}" + (f"  ρ {event['rho']:.3g}" if event.get("rho") else "")
    line += f"  α {event['alpha']:.3g}" if event.get("alpha", 1.0) != 1.0 else ""
    lines = [line + f"  ({event['seconds']:.0f} s)"]
    return lines + [f"  warning: {advice}" for advice in event.get("warnings", [])]


__all__ = ["EPOCH_LINE", "event_lines", "step_line"]
