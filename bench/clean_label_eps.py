"""The clean-label backdoor's perturbation bound: attack success rate against eps, on Fashion-MNIST.

    python bench/clean_label_eps.py [--out DIR] [--seeds 0,1,2] [--trigger patch] [--eps255 0,8,16,32]

Per seed, with the detection grid's sizes (``memdisc detect``'s defaults): 6000 training rows, 1000
validation rows (disjoint, from the training split) and 2000 test rows, drawn by the seed; the ``cnn``
trained end to end (10 epochs at most, patience 3, otherwise FitConfig's defaults) on the clean rows
is the attacker's clean model.  Then per eps (in /255): the clean-label attack at its default 5 % of
the set (300 rows of the target class 2) with ``steps`` 10 of ``2.5 * eps / steps`` (eps 0: the
trigger alone, no perturbation), and a fresh ``cnn`` (the same initialisation) trained on the poisoned
set the same way.  Each CSV row: the clean model's mean loss on the chosen rows as they were, stamped
only, and perturbed and stamped (what the victim receives), its accuracy on the latter, the victim's
clean test error and attack success rate (test rows of other classes, triggered, classified as 2), and
the clean model's own ASR (the trigger's effect without any poison).  Rows go to
DIR/clean_label_eps_TRIGGER_cpu.csv (default DIR: bench/results) with provenance; one thread.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir_arg, provenance, write_csv_atomic  # noqa: E402

from memdisc.attacks import CleanLabelConfig, build_attack  # noqa: E402
from memdisc.data.datasets import load_dataset  # noqa: E402
from memdisc.eval.classification import attack_success_rate, error_rate  # noqa: E402
from memdisc.models import build_model  # noqa: E402
from memdisc.training.fit import FitConfig, train_end_to_end  # noqa: E402

STEPS = 10


def seed_data(seed: int):
    """``(x, y, x_val, y_val, x_test, y_test)`` of one seed: float pixels in [0, 1], int64 labels."""
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(train.images.shape[0], generator=g)
    xs, ys = torch.as_tensor(train.images).float() / 255, torch.as_tensor(train.labels)
    rows = torch.randperm(test.images.shape[0], generator=g)[:2000]
    return (xs[perm[:6000]], ys[perm[:6000]], xs[perm[6000:7000]], ys[perm[6000:7000]],
            torch.as_tensor(test.images).float()[rows] / 255, torch.as_tensor(test.labels)[rows])


def fresh(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", in_channels=1, num_classes=10, image_size=28)


def run_seed(seed: int, trigger: str, eps_list: list[float]) -> list[dict]:
    x, y, xv, yv, xt, yt = seed_data(seed)
    fit = FitConfig(epochs=10, patience=3, seed=seed)
    clean = fresh(seed)
    train_end_to_end(clean, x, y, xv, yv, fit)
    clean_err = error_rate(clean, xt, yt)
    out = []
    for eps in eps_list:
        cfg = CleanLabelConfig(eps=eps / 255, steps=STEPS if eps else 0, step_size=2.5 * eps / 255 / STEPS or 1.0,
                               trigger=trigger)
        attack = build_attack("clean-label", seed, cfg, num_classes=10)
        poisoned = attack.poison(clean, x, y, 0)
        rows = poisoned.poisoned
        with torch.no_grad():
            losses = [F.cross_entropy(clean(v), y[rows]).item() for v in (x[rows], attack.stamp(x[rows]),
                                                                          poisoned.x[rows])]
            acc = (clean(poisoned.x[rows]).argmax(1) == y[rows]).float().mean().item()
        victim = fresh(seed)
        log = train_end_to_end(victim, poisoned.x, poisoned.y, xv, yv, fit)
        out.append({"seed": seed, "trigger": trigger, "eps255": eps, "poisons": int(rows.sum()),
                    "clean_model_err": round(clean_err, 4),
                    "clean_model_asr": round(attack_success_rate(clean, attack, xt, yt), 4),
                    "clean_loss_clean": round(losses[0], 3), "clean_loss_stamped": round(losses[1], 3),
                    "clean_loss_poison": round(losses[2], 3), "clean_acc_poison": round(acc, 3),
                    "victim_err": round(error_rate(victim, xt, yt), 4),
                    "victim_asr": round(attack_success_rate(victim, attack, xt, yt), 4),
                    "best_epoch": log.best_epoch, **provenance("cpu")})
        print({k: out[-1][k] for k in ("seed", "trigger", "eps255", "victim_err", "victim_asr")}, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        type=out_dir_arg, help="directory for the CSV")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trigger", default="patch", choices=("patch", "blended"))
    parser.add_argument("--eps255", default="0,8,16,32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += run_seed(seed, args.trigger, [float(e) for e in args.eps255.split(",")])
    write_csv_atomic(os.path.join(args.out, f"clean_label_eps_{args.trigger}_cpu.csv"), rows)


if __name__ == "__main__":
    main()
