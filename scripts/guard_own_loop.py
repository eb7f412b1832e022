"""Guard your own online-training loop with DSC: a worked example with a model memdisc did not build.

    python scripts/guard_own_loop.py [--data-dir DIR] [--steps 60] [--attack] [--seed 0]

What it does, in the order a deployment would:

1. trains a plain ``nn.Sequential`` MLP (not a memdisc model) on Fashion-MNIST for one epoch:
   the model as deployed;
2. keeps snapshots of it: the deployed weights (fixed) and a ring slot that follows the online
   model 10 steps behind (``SnapshotSet([deployed], ring_lags=(10,))``);
3. consumes a stream of fresh batches with ``dsc.train_step``; with ``--attack`` every batch is
   poisoned by memdisc's accumulative attack against the live model, and the poisoned trigger
   batch arrives last;
4. prints, every 10 steps, the batch's mean discrepancy, how many rows DSC corrected and the test
   error, and at the end the test error (with ``--attack``: before and after the trigger batch).

Everything the guard needs is in four calls: ``SnapshotSet``, ``DSC(...)``, ``snaps.observe`` and
``dsc.train_step``; the rest is an ordinary PyTorch loop.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from memdisc.attacks import AccumulativeAttack, AttackConfig, AttackData
from memdisc.data import iterate_minibatches, load_dataset
from memdisc.defenses import DSC, ThresholdSchedule
from memdisc.snapshots import SnapshotSet


def test_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) != y).float().mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: the Debian package's)")
    ap.add_argument("--steps", type=int, default=60, help="online steps")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--attack", action="store_true", help="poison every batch (accumulative attack) and send a trigger")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        ap.error("--steps must be >= 1 and --batch-size >= 2")
    torch.manual_seed(args.seed)

    train, test = load_dataset("fashion-mnist", "train", args.data_dir), load_dataset("fashion-mnist", "test", args.data_dir)
    x_test, y_test = test.tensors()
    held = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:500]
    x_held, y_held = train.batch(held)  # clean data the defender trusts: calibrates DSC's threshold

    # 1. The deployed model: anyone's architecture.
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for x, y in iterate_minibatches(train, 128, torch.Generator().manual_seed(args.seed)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    print(f"deployed model: test error {100 * test_error(model, x_test, y_test):.2f} %")

    # 2. The guard: snapshots + DSC with a threshold calibrated on the trusted clean data.
    snaps = SnapshotSet([model], ring_lags=(10,))
    dsc = DSC(snaps, mode="batch", schedule=ThresholdSchedule("calibrated", quantile=0.95), heldout=(x_held, y_held))

    stream = iterate_minibatches(train, args.batch_size, torch.Generator().manual_seed(args.seed + 1), drop_last=True)
    attack = None
    if args.attack:
        x_trig, y_trig = next(stream)
        data = AttackData(test.num_classes, x_val=x_test[:500], y_val=y_test[:500], x_trigger=x_trig, y_trigger=y_trig)
        attack = AccumulativeAttack(AttackConfig(), data, seed=args.seed)
        attack.prepare(model)

    # 3. The online loop.  A batch whose mean discrepancy exceeds the threshold is also an alarm
    #    a deployment can act on (log, quarantine, roll back), whatever the correction achieves.
    flagged = 0
    for step in range(args.steps):
        x, y = next(stream)
        if attack is not None:
            x = attack.poison(model, x, y, step).x
        snaps.observe(model)
        _, report = dsc.train_step(model, opt, x, y, step)
        flagged += float(report.md.mean()) > report.threshold
        if step % 10 == 9 or step == args.steps - 1:
            print(f"step {step + 1:4d}: batch MD {float(report.md.mean()):.4f} (threshold {report.threshold:.4f}), "
                  f"rows corrected {int(report.moved.sum())}/{x.shape[0]}, batches flagged {flagged}/{step + 1}, "
                  f"test error {100 * test_error(model, x_test, y_test):.2f} %", flush=True)
    result = {"error": test_error(model, x_test, y_test), "flagged": flagged}
    if attack is not None:  # 4. the trigger batch
        x_trig, y_trig = attack.trigger_batch(model)
        snaps.observe(model)
        _, report = dsc.train_step(model, opt, x_trig, y_trig, args.steps)
        result.update(error_before_trigger=result["error"], error=test_error(model, x_test, y_test),
                      trigger_md=float(report.md.mean()))
        print(f"trigger batch: MD {result['trigger_md']:.4f}, test error {100 * result['error_before_trigger']:.2f} % "
              f"-> {100 * result['error']:.2f} %")
    print(f"final test error {100 * result['error']:.2f} %")
    return result


if __name__ == "__main__":
    main()
