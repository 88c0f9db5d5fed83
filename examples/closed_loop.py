"""Closed-loop example: react to an SAE unit's evidence within the frame that carried it.

A recording (or a simulated session) is streamed to a cortexlens server as a live session. For
every prediction, if the chosen SAE unit's attribution to the predicted class of the chosen task
exceeds a threshold (optionally only when a given class is predicted), `trigger_stimulus()` is
called; it stands in for the rig's TTL output to the stimulus computer. Each reaction is printed
with how long after its frame was sent it happened, against the frame period (the budget for
reacting "within the same frame").

Run it against a local server:

    cortexlens serve ...                      # in one terminal (see README, "Service")
    python examples/closed_loop.py --target 127.0.0.1:9000 --simulate --minutes 1 \\
        --task direction --threshold 0.5      # unit: the first one labelled for the task
    python examples/closed_loop.py --recording ../shared/data/park2024/SESSION.mat --unit 12

Exit status 0; 1 on a gRPC error (printed as one ``error:`` line).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.client import Client, CortexlensError, explanation_text


@dataclass
class Reaction:
    frame_index: int
    predicted: str
    attribution: float
    reaction_ms: float  # from sending the frame to the trigger having been issued


@dataclass
class Trigger:
    """Stands in for the rig's TTL line: records when it fired."""

    fired: list[int] = field(default_factory=list)

    def __call__(self, frame_index: int) -> None:
        # A real rig would write to a DAQ line here (nidaqmx, a serial Arduino, ...).
        self.fired.append(frame_index)


def _load(args: argparse.Namespace):
    if args.recording:
        from models.data.io import load_recordings

        recs = load_recordings([args.recording])
        return recs[0]
    from models.data.simulate import SimConfig, simulate_session

    rec, _ = simulate_session(
        SimConfig(n_cells=args.cells, minutes=args.minutes), seed=args.seed, session_index=0
    )
    return rec


def _choose_unit(client: Client, task: str) -> int:
    """The first SAE unit labelled for ``task`` (the strongest statistic wins)."""
    resp = client.units(variable=task)
    best: tuple[float, int] | None = None
    for u in resp.units:
        for lab in u.labels:
            if lab.variable == task and (best is None or lab.statistic > best[0]):
                best = (lab.statistic, u.unit)
    if best is None:
        raise SystemExit(f"error: the served model has no unit labelled for '{task}'; use --unit")
    return best[1]


def run(argv: Sequence[str] | None = None) -> list[Reaction]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="127.0.0.1:9000", help="server HOST:PORT")
    ap.add_argument("--token", default=None, help="bearer token, if the server wants one")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--recording", help="a recording file (.mat, .nwb, .h5)")
    src.add_argument("--simulate", action="store_true", help="stream a simulated session")
    ap.add_argument("--cells", type=int, default=100, help="simulated cells")
    ap.add_argument("--minutes", type=float, default=1.0, help="simulated minutes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", default="direction", help="task head to watch")
    ap.add_argument("--unit", type=int, default=None, help="SAE unit (default: best labelled)")
    ap.add_argument("--threshold", type=float, default=0.5, help="attribution to react to")
    ap.add_argument("--when", default=None, help="react only when this class is predicted")
    ap.add_argument("--speed", type=float, default=1.0, help="replay speed")
    ap.add_argument("--fast", action="store_true", help="send as fast as possible")
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--top-m", type=int, default=16, help="units returned per task")
    args = ap.parse_args(argv)

    rec = _load(args)
    frame_ms = 1000.0 / rec.sampling_rate
    trigger_stimulus = Trigger()
    reactions: list[Reaction] = []
    try:
        with Client(args.target, token=args.token) as client:
            unit = args.unit if args.unit is not None else _choose_unit(client, args.task)
            print(f"watching unit u{unit} on '{args.task}', threshold {args.threshold:+.2f}")
            with client.stream(
                rec,
                realtime=not args.fast,
                speed=args.speed,
                max_frames=args.max_frames,
                decode_stride=1,
                top_m=args.top_m,
                metadata={"client": "examples/closed_loop.py"},
            ) as s:
                for item in s:
                    if item.kind != "prediction":
                        continue
                    p = item.message
                    task = next((t for t in p.tasks if t.task == args.task), None)
                    if task is None:
                        continue
                    if args.when is not None and task.predicted_label != args.when:
                        continue
                    attr = next((u.attribution for u in task.units if u.unit == unit), None)
                    if attr is None or attr <= args.threshold:
                        continue
                    trigger_stimulus(int(p.frame_index))
                    sent = s.sent_at(p.frame_index)
                    if sent is None:
                        continue
                    r = Reaction(
                        int(p.frame_index),
                        task.predicted_label,
                        float(attr),
                        (time.perf_counter() - sent) * 1000.0,
                    )
                    reactions.append(r)
                    within = "within" if r.reaction_ms <= frame_ms else "AFTER"
                    print(
                        f"frame {r.frame_index:>6}: trigger, {r.reaction_ms:6.2f} ms after send "
                        f"({within} the {frame_ms:.1f} ms frame)  {explanation_text(task)}"
                    )
            st = s.stats()
    except CortexlensError as e:
        print(f"error: {e.code.name}: {e.details}", file=sys.stderr)
        raise SystemExit(1) from None
    lat = np.array([r.reaction_ms for r in reactions])
    summary = f"{len(reactions)} triggers in {st.predictions} predictions ({st.frames_sent} frames)"
    if lat.size:
        summary += (
            f"; reaction ms p50 {np.percentile(lat, 50):.2f}, p99 {np.percentile(lat, 99):.2f}, "
            f"within one frame {np.mean(lat <= frame_ms):.0%}"
        )
    print(summary)
    return reactions


if __name__ == "__main__":
    run()
