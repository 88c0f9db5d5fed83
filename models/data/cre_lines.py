"""The 13 Cre lines of the Allen Brain Observatory and the statistics the simulator gives each.

The numbers are loose, order-of-magnitude choices informed by the Allen Brain Observatory papers
(de Vries et al. 2020, Nat. Neurosci.; Siegle/Millman et al.), not fits to the data: excitatory
lines are sharply tuned (von Mises concentration ~2-3, half-width ~30-40 degrees) and sparse;
inhibitory lines (Pvalb, Sst, Vip) are broadly tuned, fire more at baseline, and share much of
their tuning with their neighbours. ``signal_corr_target`` is the median pairwise signal
correlation that ``shared_weight`` was calibrated to give: the Allen medians for Pvalb (0.43),
Vip (0.29) and Sst (0.28), and values in the published 0.04-0.20 range for the excitatory lines.
It is measured as the Allen Brain Observatory measured it: correlations of the trial-averaged
mean dF/F in the 40 grating conditions (~15 repeats each, i.e. a ~31-minute session), among the
responsive cells, averaged over 6 simulated sessions. The noise-free planted tuning curves
(`GroundTruth.signal_correlations`) correlate somewhat more (Pvalb ~0.57, Sst/Vip ~0.36,
excitatory 0.05-0.28), as trial-to-trial noise lowers the measured figure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CreLine:
    """Per-Cre-line statistics of the simulated cells.

    Fields:
        name: the Allen name of the line.
        cell_class: ``"excitatory"`` or ``"inhibitory"``.
        layers: cortical layer(s) the line labels (documentation only).
        depth_um: imaging depths (µm) a session of this line is drawn from.
        frac_responsive: probability that a cell responds to drifting gratings at all.
        kappa: median von Mises concentration of the direction tuning (log-normal spread).
        p_orientation: fraction of responsive cells that are orientation selective (a second
            peak at pref + 180 degrees) rather than direction selective.
        tf_pref_probs: probabilities of preferring 1, 2, 4, 8, 15 Hz.
        tf_sigma_oct: width (s.d., octaves) of the log-Gaussian temporal-frequency tuning.
        baseline_rate_hz: median spontaneous event rate.
        peak_rate_hz: median evoked event rate at the preferred condition (the cell's gain).
        spike_amp: dF/F of one event at its peak (indicator, expression level, cell size).
        noise_std: median s.d. of the measurement noise of dF/F per frame at 30 Hz.
        shared_weight: weight of the session-wide shared tuning curve in each responsive cell's
            tuning (0 = all tuning private to the cell).
        shared_kappa: von Mises concentration of the shared tuning curve.
        state_coupling: s.d. over cells of the coupling to a slow, session-wide state signal
            (arousal/locomotion-like; Vip strongest).
        signal_corr_target: median signal correlation ``shared_weight`` was calibrated to.
    """

    name: str
    cell_class: str
    layers: str
    depth_um: tuple[int, ...]
    frac_responsive: float
    kappa: float
    p_orientation: float
    tf_pref_probs: tuple[float, float, float, float, float]
    tf_sigma_oct: float
    baseline_rate_hz: float
    peak_rate_hz: float
    spike_amp: float
    noise_std: float
    shared_weight: float
    shared_kappa: float
    state_coupling: float
    signal_corr_target: float

    @property
    def inhibitory(self) -> bool:
        return self.cell_class == "inhibitory"

    def to_dict(self) -> dict:
        return asdict(self)


_L23 = (0.35, 0.30, 0.20, 0.10, 0.05)  # layer 2/3 and 4: low temporal frequencies
_L5 = (0.20, 0.25, 0.30, 0.15, 0.10)  # deeper layers: higher temporal frequencies

_TABLE = (
    # name, class, layers, depths, frac_resp, kappa, p_orient, tf_probs, tf_sigma,
    # base Hz, peak Hz, spike_amp, noise, shared_w, shared_kappa, state, sc_target
    ("Cux2-CreERT2", "excitatory", "L2/3-4", (175, 275), 0.45, 2.5, 0.35, _L23, 1.0,
     0.5, 5.0, 0.12, 0.030, 0.20, 1.0, 0.15, 0.10),
    ("Emx1-IRES-Cre", "excitatory", "all", (175, 275, 375), 0.40, 2.2, 0.35,
     (0.30, 0.30, 0.20, 0.12, 0.08), 1.0, 0.5, 4.0, 0.10, 0.035, 0.23, 1.0, 0.15, 0.10),
    ("Fezf2-CreER", "excitatory", "L5 PT", (300, 375), 0.25, 1.8, 0.40,
     (0.15, 0.25, 0.30, 0.20, 0.10), 1.1, 1.0, 3.0, 0.10, 0.040, 0.30, 1.0, 0.15, 0.15),
    ("Nr5a1-Cre", "excitatory", "L4", (350,), 0.35, 2.2, 0.35,
     (0.25, 0.30, 0.25, 0.12, 0.08), 1.0, 0.5, 4.0, 0.10, 0.040, 0.27, 1.0, 0.15, 0.12),
    ("Ntsr1-Cre_GN220", "excitatory", "L6 CT", (550, 625), 0.30, 1.6, 0.35,
     (0.10, 0.20, 0.30, 0.25, 0.15), 1.2, 0.8, 3.0, 0.08, 0.040, 0.35, 1.0, 0.15, 0.20),
    ("Pvalb-IRES-Cre", "inhibitory", "L2/3-6", (175, 275, 375), 0.35, 0.8, 0.60,
     (0.20, 0.30, 0.30, 0.15, 0.05), 1.4, 4.0, 8.0, 0.05, 0.040, 0.47, 1.0, 0.20, 0.43),
    ("Rbp4-Cre_KL100", "excitatory", "L5", (375,), 0.30, 2.0, 0.35, _L5, 1.1,
     0.8, 3.5, 0.10, 0.040, 0.27, 1.0, 0.15, 0.12),
    ("Rorb-IRES2-Cre", "excitatory", "L4", (275,), 0.45, 2.6, 0.35, _L23, 1.0,
     0.5, 5.0, 0.12, 0.030, 0.15, 1.0, 0.15, 0.06),
    ("Scnn1a-Tg3-Cre", "excitatory", "L4", (350,), 0.45, 2.8, 0.35, _L23, 1.0,
     0.5, 5.0, 0.12, 0.030, 0.14, 1.0, 0.15, 0.04),
    ("Slc17a7-IRES2-Cre", "excitatory", "all", (175, 275, 375), 0.40, 2.2, 0.35,
     (0.30, 0.30, 0.20, 0.12, 0.08), 1.0, 0.5, 4.0, 0.10, 0.035, 0.22, 1.0, 0.15, 0.08),
    ("Sst-IRES-Cre", "inhibitory", "L2/3-6", (275, 375), 0.45, 1.2, 0.50,
     (0.30, 0.25, 0.20, 0.15, 0.10), 1.2, 2.0, 6.0, 0.06, 0.040, 0.40, 1.0, 0.25, 0.28),
    ("Tlx3-Cre_PL56", "excitatory", "L5 IT", (375,), 0.30, 2.0, 0.35, _L5, 1.1,
     0.8, 3.5, 0.10, 0.040, 0.23, 1.0, 0.15, 0.10),
    ("Vip-IRES-Cre", "inhibitory", "L2/3", (175, 275), 0.40, 1.2, 0.50,
     (0.15, 0.25, 0.30, 0.20, 0.10), 1.3, 2.0, 6.0, 0.08, 0.040, 0.38, 1.0, 0.40, 0.29),
)  # fmt: skip

CRE_LINES: dict[str, CreLine] = {row[0]: CreLine(*row) for row in _TABLE}
CRE_LINE_NAMES: tuple[str, ...] = tuple(sorted(CRE_LINES))
INHIBITORY_LINES: tuple[str, ...] = tuple(n for n in CRE_LINE_NAMES if CRE_LINES[n].inhibitory)
EXCITATORY_LINES: tuple[str, ...] = tuple(n for n in CRE_LINE_NAMES if not CRE_LINES[n].inhibitory)


def cre_line(name: str) -> CreLine:
    """The statistics of one Cre line; `KeyError` naming the known lines otherwise."""
    try:
        return CRE_LINES[name]
    except KeyError:
        raise KeyError(f"unknown Cre line '{name}' (known: {', '.join(CRE_LINE_NAMES)})") from None
