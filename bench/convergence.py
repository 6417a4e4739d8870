"""The momentum theory, reproduced on fastmomentum's own kernels.

    python -m bench.convergence                           # about half a minute
    python -m bench.convergence --output bench/results    # replace the committed results

Every iterate comes from `fastmomentum.kernels.sgd_step` (float64) on a diagonal
quadratic ``f(x) = ½ Σ λᵢ xᵢ²`` (gradient ``λ ⊙ x``, minimum 0 at 0), so the numbers
measure the library's update rules, not a separate model of them:

1. strongly convex, κ = L/μ ∈ {10, 100, 1000, 10000}: the asymptotic linear rate of
   ‖xₖ‖ for gradient descent with step 2/(L+μ) (theory (κ−1)/(κ+1)), Polyak's heavy ball
   with lr 4/(√L+√μ)² and β = ((√κ−1)/(√κ+1))² (theory (√κ−1)/(√κ+1)), and Nesterov
   with lr 1/L and β = (√κ−1)/(√κ+1) (theory 1 − 1/√κ); and the iterations to 1e-6
   relative error against the O(κ log 1/ε) and O(√κ log 1/ε) scalings;
2. convex, not strongly convex (eigenvalues down to 0): f(xₖ) − f* for gradient
   descent (O(1/k)) and Nesterov with βₖ = k/(k+3) (O(1/k²)), as fitted log-log slopes;
3. the β table: a velocity's effective window Σβᵏ = 1/(1−β) and effective learning rate
   lr/(1−β), measured from the kernel's response to an impulse and a constant gradient;
4. the two momentum conventions under constant lr, linear warmup and step decay;
5. the adaptive members of the family (RMSprop with momentum, Adam, NAdam: their own
   kernels, float64) on the same κ-conditioned quadratics, diagonal and rotated by a
   random orthogonal matrix: iterations to 1e-6 relative error at the best lr of a grid.

Results go to ``convergence.{json,png,md}`` in ``bench/out/`` (untracked), or in the
folder ``--output`` names; the committed run is in ``bench/results/``.
"""

import json
import math

import numpy as np

from fastmomentum.kernels import adam_step, nadam_step, rmsprop_step, sgd_step

from . import cli

KAPPAS = [10, 100, 1000, 10000]
BETAS = [0.0, 0.5, 0.9, 0.95, 0.99]


def spectrum(kappa, size=64, smallest=1.0):
    """Eigenvalues spread evenly over [μ, L] = [smallest, κ·smallest], both ends included."""
    return np.linspace(smallest, kappa * smallest, size)


def iterate(
    eigenvalues,
    start,
    steps,
    lr,
    momentum=0.0,
    nesterov=False,
    schedule=None,
    convention="pytorch",
    until=None,
):
    """Run ``sgd_step`` on ``½ Σ λᵢ xᵢ²``; returns ‖xₖ‖ (k = 0…) and the final iterate.

    ``schedule(k)`` may give (lr, momentum) per step; ``until`` stops once ‖xₖ‖/‖x₀‖
    falls below it.
    """
    x = start.astype(np.float64).copy()
    velocity = np.zeros_like(x)
    grad = np.empty_like(x)
    norms = [np.linalg.norm(x)]
    for k in range(steps):
        step_lr, step_momentum = schedule(k) if schedule else (lr, momentum)
        np.multiply(eigenvalues, x, out=grad)
        sgd_step(
            x,
            grad,
            velocity,
            lr=step_lr,
            momentum=step_momentum,
            nesterov=nesterov and step_momentum > 0,
            first_step=k == 0,
            momentum_convention=convention,
        )
        norms.append(np.linalg.norm(x))
        if until is not None and norms[-1] <= until * norms[0]:
            break
    return np.array(norms), x


def methods(kappa, smallest=1.0):
    """(name, lr, momentum, nesterov, predicted rate) for a κ-conditioned quadratic."""
    mu, big_l = smallest, kappa * smallest
    root = math.sqrt(kappa)
    return [
        ("gradient descent", 2 / (big_l + mu), 0.0, False, (kappa - 1) / (kappa + 1)),
        (
            "heavy ball",
            4 / (math.sqrt(big_l) + math.sqrt(mu)) ** 2,
            ((root - 1) / (root + 1)) ** 2,
            False,
            (root - 1) / (root + 1),
        ),
        ("Nesterov", 1 / big_l, (root - 1) / (root + 1), True, 1 - 1 / root),
    ]


def fitted_rate(norms, high=1e-3, low=1e-10):
    """exp of the slope of log‖xₖ‖ over the iterations where ‖xₖ‖/‖x₀‖ ∈ [low, high]."""
    relative = norms / norms[0]
    window = np.flatnonzero((relative <= high) & (relative >= low))
    slope = np.polyfit(window, np.log(relative[window]), 1)[0]
    return math.exp(slope)


def strongly_convex_study():
    rows = []
    start = np.ones(64)
    for kappa in KAPPAS:
        for name, lr, momentum, nesterov, predicted in methods(kappa):
            budget = (
                int(40 * kappa) + 1000
                if name == "gradient descent"
                else int(60 * math.sqrt(kappa)) + 1000
            )
            norms, _ = iterate(spectrum(kappa), start, budget, lr, momentum, nesterov, until=1e-11)
            reached = np.flatnonzero(norms / norms[0] <= 1e-6)
            rate = fitted_rate(norms)
            every = max(1, len(norms) // 400)
            rows.append(
                {
                    "kappa": kappa,
                    "method": name,
                    "lr": lr,
                    "momentum": momentum,
                    "measured_rate": rate,
                    "predicted_rate": predicted,
                    "ratio": rate / predicted,
                    "iterations_to_1e-6": int(reached[0]) if reached.size else None,
                    "norms": norms[::every].tolist(),
                    "every": every,
                }
            )
    return rows


def scaling_exponents(rows):
    """log-log slope of iterations-to-1e-6 against κ, per method (theory: 1, ½, ½)."""
    exponents = {}
    for method in dict.fromkeys(row["method"] for row in rows):
        points = [
            (row["kappa"], row["iterations_to_1e-6"]) for row in rows if row["method"] == method
        ]
        kappas, iterations = zip(*points)
        exponents[method] = float(np.polyfit(np.log(kappas), np.log(iterations), 1)[0])
    return exponents


def convex_study(size=1_000_000, steps=400):
    """f − f* on a quadratic whose eigenvalues reach 0; start weighted 1/√λ (worst case).

    The smallest nonzero eigenvalue is 1/size; until k ≈ √size = 1000 the problem looks
    merely convex to both methods, so the fit uses k ∈ [10, 300].
    """
    eigenvalues = np.concatenate([np.zeros(100), np.linspace(1.0 / size, 1.0, size)])
    start = np.concatenate([np.ones(100), 1 / np.sqrt(eigenvalues[100:])])

    def value(x):
        return 0.5 * float(np.sum(eigenvalues * x * x))

    results = {}
    for name, nesterov in (("gradient descent", False), ("Nesterov", True)):
        x = start.copy()
        velocity, grad = np.zeros_like(x), np.empty_like(x)
        gaps = [value(x)]
        for k in range(steps):
            momentum = k / (k + 3) if nesterov else 0.0
            np.multiply(eigenvalues, x, out=grad)
            sgd_step(
                x,
                grad,
                velocity,
                lr=1.0,
                momentum=momentum,
                nesterov=nesterov and momentum > 0,
                first_step=k == 0,
            )
            gaps.append(value(x))
        gaps = np.array(gaps)
        ks = np.arange(len(gaps))
        window = (ks >= 10) & (ks <= 300)  # k ≪ √(1/λ_min): the convex regime
        slope = float(np.polyfit(np.log(ks[window]), np.log(gaps[window]), 1)[0])
        results[name] = {"slope": slope, "gaps": gaps[::10].tolist(), "every": 10}
    return results


def beta_table(lr=0.1, steps=5000):
    """Effective window and learning rate of SGD momentum, measured from the kernel."""
    rows = []
    for beta in BETAS:
        param, velocity = np.zeros(1), np.zeros(1)
        # impulse: one unit gradient, then zeros; the total displacement is lr·Σβᵏ
        for k in range(steps):
            grad = np.array([1.0 if k == 0 else 0.0])
            sgd_step(param, grad, velocity, lr=lr, momentum=beta, first_step=k == 0)
        window = -param[0] / lr
        # constant gradient: the step size settles at lr/(1−β)
        param, velocity = np.zeros(1), np.zeros(1)
        previous = 0.0
        for k in range(steps):
            sgd_step(param, np.ones(1), velocity, lr=lr, momentum=beta, first_step=k == 0)
            step, previous = previous - param[0], param[0]
        rows.append(
            {
                "beta": beta,
                "window": window,
                "predicted_window": 1 / (1 - beta),
                "effective_lr": step,
                "predicted_effective_lr": lr / (1 - beta),
            }
        )
    return rows


def schedules(steps=200, lr=0.01):
    return {
        "constant": lambda k: (lr, 0.9),
        "warmup": lambda k: (lr * min(1.0, (k + 1) / 50), 0.9),
        "step decay": lambda k: (lr if k < 100 else lr / 10, 0.9),
    }


def conventions_study(kappa=100, steps=200):
    """‖x‖ trajectories of both conventions per schedule, and their largest gap."""
    eigenvalues, start = spectrum(kappa), np.ones(64)
    results = {}
    for name, schedule in schedules(steps).items():
        runs = {
            convention: iterate(
                eigenvalues, start, steps, 0.0, schedule=schedule, convention=convention
            )[0]
            for convention in ("pytorch", "lr_folded")
        }
        gap = np.abs(runs["pytorch"] - runs["lr_folded"]) / runs["pytorch"]
        results[name] = {
            "max_relative_gap": float(gap.max()),
            **{c: r.tolist() for c, r in runs.items()},
        }
    return results


ADAPTIVE = ("RMSprop momentum", "Adam", "NAdam")
ADAPTIVE_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def adaptive_iterations(method, kappa, lr, rotated=False, budget=20_000, until=1e-6, size=64):
    """Iterations of ``method`` (one of `ADAPTIVE`, default hyperparameters but lr; RMSprop
    with momentum 0.9) until ‖xₖ‖/‖x₀‖ ≤ ``until`` on the κ-conditioned quadratic (its
    eigenvectors the axes, or random ``rotated`` ones), from a random start; ``None``
    if not within ``budget``."""
    rng = np.random.default_rng(0)
    eigenvalues = spectrum(kappa, size)
    basis = np.linalg.qr(rng.standard_normal((size, size)))[0] if rotated else None
    x = rng.standard_normal(size)
    first, second = np.zeros(size), np.zeros(size)
    mu_product, start = 1.0, np.linalg.norm(x)
    for k in range(1, budget + 1):
        grad = eigenvalues * x if basis is None else basis @ (eigenvalues * (basis.T @ x))
        if method == "RMSprop momentum":
            rmsprop_step(x, grad, first, second, lr=lr, momentum=0.9)
        elif method == "Adam":
            adam_step(x, grad, first, second, step=k, lr=lr)
        else:
            mu_product = nadam_step(x, grad, first, second, step=k, mu_product=mu_product, lr=lr)
        if np.linalg.norm(x) <= until * start:
            return k
    return None


def adaptive_study(kappas=(10, 100, 1000, 10000)):
    """Per (layout, κ, method): the fewest iterations to 1e-6 over `ADAPTIVE_LRS`."""
    rows = []
    for rotated in (False, True):
        for kappa in kappas:
            for method in ADAPTIVE:
                runs = [
                    (adaptive_iterations(method, kappa, lr, rotated), lr) for lr in ADAPTIVE_LRS
                ]
                reached = [run for run in runs if run[0] is not None]
                iterations, lr = min(reached) if reached else (None, None)
                rows.append(
                    {
                        "quadratic": "rotated" if rotated else "diagonal",
                        "kappa": kappa,
                        "method": method,
                        "iterations_to_1e-6": iterations,
                        "best_lr": lr,
                    }
                )
    return rows


def markdown(report):
    lines = [
        "| κ | method | measured rate | predicted | measured / predicted | iterations to 1e-6 |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["strongly_convex"]:
        lines.append(
            f"| {row['kappa']} | {row['method']} | {row['measured_rate']:.5f} | "
            f"{row['predicted_rate']:.5f} | {row['ratio']:.4f} | "
            f"{row['iterations_to_1e-6']} |"
        )
    exponents = report["iteration_scaling_exponents"]
    lines.append("")
    lines.append(
        "Iterations to 1e-6 grow as κ^e: "
        + ", ".join(f"{name} e = {value:.2f}" for name, value in exponents.items())
        + " (theory 1, ½, ½)."
    )
    convex = report["convex"]
    lines.append(
        f"Convex, λ down to 0: f(xₖ) − f* ∝ k^s with s = "
        f"{convex['gradient descent']['slope']:.2f} for gradient descent (theory −1) "
        f"and {convex['Nesterov']['slope']:.2f} for Nesterov (theory −2)."
    )
    lines.append("")
    lines.append("| β | window Σβᵏ | 1/(1−β) | effective lr | lr/(1−β) |")
    lines.append("| ---: | ---: | ---: | ---: | ---: |")
    for row in report["beta_table"]:
        lines.append(
            f"| {row['beta']} | {row['window']:.3f} | {row['predicted_window']:.3f} | "
            f"{row['effective_lr']:.4f} | {row['predicted_effective_lr']:.4f} |"
        )
    lines.append("")
    lines.append(
        "Conventions (heavy ball, κ = 100, lr 0.01, β 0.9), largest relative gap "
        "between the PyTorch and lr-folded trajectories of ‖x‖: "
        + ", ".join(
            f"{name} {value['max_relative_gap']:.2e}"
            for name, value in report["conventions"].items()
        )
        + "."
    )
    if "adaptive" in report:
        lines += ["", _adaptive_table(report["adaptive"])]
    return "\n".join(lines)


def _adaptive_table(rows):
    kappas = sorted({row["kappa"] for row in rows})
    lines = [
        "Adaptive methods, iterations to 1e-6 at the best lr of "
        f"{', '.join(str(lr) for lr in ADAPTIVE_LRS)} (- : not within 20000):",
        "",
        "| quadratic | method | " + " | ".join(f"κ = {k}" for k in kappas) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in kappas) + " |",
    ]
    for quadratic in ("diagonal", "rotated"):
        for method in ADAPTIVE:
            cells = []
            for kappa in kappas:
                row = next(
                    r
                    for r in rows
                    if (r["quadratic"], r["method"], r["kappa"]) == (quadratic, method, kappa)
                )
                iterations = row["iterations_to_1e-6"]
                cells.append("-" if iterations is None else f"{iterations} (lr {row['best_lr']})")
            lines.append(f"| {quadratic} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    axis = axes[0][0]
    for row in report["strongly_convex"]:
        if row["kappa"] != 100:
            continue
        relative = np.array(row["norms"]) / row["norms"][0]
        ks = np.arange(len(relative)) * row["every"]
        (line,) = axis.semilogy(ks, relative, label=f"{row['method']} (measured)")
        anchor = np.flatnonzero(relative <= 1e-3)[0]  # theory drawn through this point
        axis.semilogy(
            ks,
            relative[anchor] * row["predicted_rate"] ** (ks - ks[anchor]),
            "--",
            color=line.get_color(),
            label=f"rate {row['predicted_rate']:.3f} (theory)",
        )
    axis.set_ylim(1e-12, 2)
    axis.set_title("κ = 100: ‖xₖ‖/‖x₀‖")
    axis.set_xlabel("iteration")
    axis.legend(fontsize=8)

    axis = axes[0][1]
    for method in dict.fromkeys(r["method"] for r in report["strongly_convex"]):
        points = [
            (r["kappa"], r["iterations_to_1e-6"])
            for r in report["strongly_convex"]
            if r["method"] == method
        ]
        axis.loglog(*zip(*points), "o-", label=method)
    kappas = np.array(KAPPAS, dtype=float)
    axis.loglog(kappas, 7 * kappas, "k--", label="∝ κ")
    axis.loglog(kappas, 7 * np.sqrt(kappas), "k:", label="∝ √κ")
    axis.set_title("iterations to 1e-6 relative error")
    axis.set_xlabel("κ")
    axis.legend(fontsize=8)

    axis = axes[1][0]
    for name, result in report["convex"].items():
        gaps = np.array(result["gaps"])
        ks = np.arange(len(gaps)) * result["every"]
        axis.loglog(ks[1:], gaps[1:] / gaps[0], label=f"{name}: slope {result['slope']:.2f}")
    ks = np.array([10.0, 400.0])
    axis.loglog(ks, 0.5 * (ks / 10) ** -1.0, "k--", label="∝ 1/k")
    axis.loglog(ks, 0.02 * (ks / 10) ** -2.0, "k:", label="∝ 1/k²")
    axis.set_title("convex (λ down to 0): f(xₖ) − f*")
    axis.set_xlabel("iteration")
    axis.legend(fontsize=8)

    axis = axes[1][1]
    for name, result in report["conventions"].items():
        for convention, style in (("pytorch", "-"), ("lr_folded", "--")):
            axis.semilogy(result[convention], style, label=f"{name}, {convention}")
    axis.set_title("conventions under schedules (κ = 100): ‖xₖ‖")
    axis.set_xlabel("iteration")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = cli.parser("bench.convergence", __doc__)
    cli.add_output(parser, "JSON, markdown and PNG")
    args = parser.parse_args(argv)
    strongly_convex = strongly_convex_study()
    report = {
        "strongly_convex": strongly_convex,
        "iteration_scaling_exponents": scaling_exponents(strongly_convex),
        "convex": convex_study(),
        "beta_table": beta_table(),
        "conventions": conventions_study(),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "convergence.json").write_text(json.dumps(report, indent=1))
    report["adaptive"] = adaptive_study()
    summary = markdown(report)
    (args.output / "convergence.md").write_text(summary + "\n")
    plot(report, args.output / "convergence.png")
    print(summary)
    print(f"\nresults in {args.output}")


if __name__ == "__main__":
    main()
