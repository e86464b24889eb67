"""Does the label stream save labels? Strategies of choosing the next images, each trained as live training does.

For each seed a pool of ``--pool`` train images is drawn; every strategy labels images from it, budget after
budget (``--budgets``, e.g. 10 20 40 60 80), and its model is scored on the test split (box mAP for a box
dataset, mask mAP for one with polygons; pycocotools) after each budget. Training follows the labels as a live
session does: one model per strategy, **continued** from the previous budget's weights with
``--steps-per-label`` steps per newly labeled image (half the draws on the new images, half replaying all),
heads-only until FULL_AFTER images and then the full model, SGD with warm-up and a cosine tail per budget.

Strategies (what Label Studio's ``/next/`` would serve, livetrain's predictions given):

* ``random``: the next images at random (Label Studio's fallback, or sequential order on shuffled data);
* ``uncertainty``: the lowest ``--measure`` confidence first (what livetrain served before clusters);
* ``clusters``: Label Studio's uncertainty sampling with livetrain's ``cluster``: the least-covered cluster
  first, then the lowest ``--cluster-measure`` confidence (``backend.inference.clusters``);
* ``typical``: the first budget typical-first (the most typical image of each uncovered cluster, as livetrain's
  cold-start predictions serve it), then as ``clusters``.

``random``, ``uncertainty`` and ``clusters`` start from the same random first budget (trained once per seed).

    python scripts/bench_active.py --data ../shared/datasets/bccd --seeds 0 1 2 3 4 --out active-bccd.json
    python scripts/bench_active.py --report active-bccd.json      # the tables again, from a finished run

Prints per budget the mean and standard error of each strategy's mAP@0.5, the area under mAP@0.5 vs labels, and
the labels each strategy needs to reach random's mAP@0.5 at the last budget (linear interpolation on the mean
curve; 95% percentile-bootstrap interval over seeds: with 5 seeds only 126 distinct resamples exist, so the
interval is narrower than it should be). ``clusters`` and ``typical`` score with ``--cluster-measure``, ``uncertainty``
with ``--measure``: to tell the clusters' effect from the measure's, run with both set the same. mAP is a deterministic function of the seeds, so a loaded machine only
makes the run slower; the seconds it prints are not benchmark figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from backend.inference.clusters import grow, target_clusters, typical_first_scores, typicality  # noqa: E402
from backend.inference.embeddings import Embedder  # noqa: E402
from backend.inference.predictor import FORWARD_BATCH, RAW_SCORE_FLOOR  # noqa: E402
from backend.inference.uncertainty import class_weights, MEASURES, detect_and_score  # noqa: E402
from backend.labelstudio.convert import image_to_tensor  # noqa: E402
from backend.model_store.models import model_for_round  # noqa: E402
from backend.model_store.weights import resolve_starting_weights  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.simulation.offline import Examples  # noqa: E402
from backend.training.coco import load_coco  # noqa: E402
from backend.training.engine import TrainState, sgd, train_steps, warmup_cosine  # noqa: E402
from backend.training.modes import apply_mode, body_trainable, choose_mode, working_limit  # noqa: E402
from backend.training.transforms import augment  # noqa: E402
from backend.training.validation import evaluate_model  # noqa: E402
from active_report import plot, report  # noqa: E402

log = logging.getLogger("bench_active")
STRATEGIES = ("random", "uncertainty", "clusters", "typical")


# -- training as live training does: one model, continued ----------------------------------------
class Learner:
    def __init__(self, starting, classes, settings: Settings, task: str, seed: int):
        random.seed(seed)
        torch.manual_seed(seed)
        self.settings, self.task, self.seed = settings, task, seed
        self.model = model_for_round(starting, None, tuple(classes), settings.min_size)
        self.trainable = body_trainable(self.model)
        self.base = self.model.transform.min_size[0]
        self.limit = working_limit(self.model)
        self.steps = 0

    def train(self, examples: list, new: list, steps: int) -> None:
        mode = choose_mode(self.settings, len(examples))
        apply_mode(self.model, mode, self.trainable)
        self.model.transform.min_size = (self.base,)
        self.model.train()
        optimizer = sgd(self.model, self.settings.learning_rate)
        state = TrainState(self.model, optimizer, warmup_cosine(optimizer, steps, min(10, steps // 5)), steps)
        rng = random.Random(self.seed * 7919 + len(examples))

        def batches():
            while True:
                pairs = [rng.choice(new if new and rng.random() < 0.5 else examples)
                         for _ in range(self.settings.batch_size)]
                images, targets = zip(*(augment(image_to_tensor(pil), target) for pil, target in pairs))
                yield list(images), list(targets)

        train_steps(state, batches(), torch.device("cpu"))
        self.steps += steps
        self.model.eval()

    def state(self) -> dict:
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def load(self, state: dict, steps: int) -> None:
        self.model.load_state_dict(state)
        self.steps = steps


@torch.inference_mode()
def confidences(model, examples: list, measure: str, weights=None) -> list[float]:
    model.eval()
    model.roi_heads.score_thresh = RAW_SCORE_FLOOR
    out = []
    for start in range(0, len(examples), FORWARD_BATCH):
        tensors = [image_to_tensor(pil) for pil, _ in examples[start:start + FORWARD_BATCH]]
        out += detect_and_score(model, tensors, measure, weights)[1]
    model.roi_heads.score_thresh = 0.05
    return out


def labeled_weights(examples: list, classes) -> tuple[float, ...] | None:
    """UNCERTAINTY=class_weighted's weights from the labeled examples, as a version's meta counts them."""
    objects = dict.fromkeys(classes, 0)
    for _, target in examples:
        for c in target["labels"].tolist():
            objects[classes[c - 1]] += 1
    return class_weights(objects, classes)


# -- choosing the next images as Label Studio's /next/ would --------------------------------------
def pick_by_cluster(candidates: list[int], scores: dict[int, float], cluster: dict[int, int],
                    labeled: list[int], need: int) -> list[int]:
    """Label Studio's uncertainty sampling, one annotator: least-covered cluster first, then lowest score;
    each pick covers its cluster once more."""
    covered: dict[int, int] = {}
    for i in labeled:
        covered[cluster[i]] = covered.get(cluster[i], 0) + 1
    left, picked = list(candidates), []
    for _ in range(min(need, len(left))):
        best = min(left, key=lambda i: (covered.get(cluster[i], 0), scores[i], i))
        picked.append(best)
        left.remove(best)
        covered[cluster[best]] = covered.get(cluster[best], 0) + 1
    return picked


def run_seed(seed: int, data: dict, args) -> list[dict]:
    rng = random.Random(seed)
    pool = rng.sample(data["train_ids"], min(args.pool, len(data["train_ids"])))
    x = np.stack([data["embedding"][i] for i in pool])
    centroids = grow(x, None, target_clusters(len(pool)), seed=seed)
    labels = np.argmin(((x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    cluster = {i: int(c) for i, c in zip(pool, labels)}
    typical = typicality(x)
    start_random = pool[: args.budgets[0]]  # the pool is already in random order
    shared: dict = {}
    rows = []
    for strategy in args.strategies:
        learner = Learner(data["starting"], data["classes"], data["settings"], data["task"], seed)
        if strategy == "typical":
            typ = typical_first_scores(typical, labels, np.ones(len(pool), bool))
            scores = {i: float(s) for i, s in zip(pool, typ)}
            labeled = pick_by_cluster(pool, scores, cluster, [], args.budgets[0])
        else:
            labeled = list(start_random)
        for b, budget in enumerate(args.budgets):
            started = time.perf_counter()
            new = labeled[len(labeled) - (budget - (args.budgets[b - 1] if b else 0)):]
            key = (b, tuple(sorted(labeled)))
            if b == 0 and strategy != "typical" and key in shared:
                learner.load(*shared[key])
            else:
                steps = args.steps_per_label * len(new)
                learner.train([data["examples"][i] for i in labeled], [data["examples"][i] for i in new], steps)
                if b == 0 and strategy != "typical":
                    shared[key] = (learner.state(), learner.steps)
                    shared[("map", key)] = evaluate_model(learner.model, data["test"], data["classes"],
                                                          data["task"] == "masks")
            scores_map = shared.get(("map", key)) if b == 0 and strategy != "typical" else None
            scores_map = scores_map or evaluate_model(learner.model, data["test"], data["classes"], data["task"] == "masks")
            kind = "mask" if data["task"] == "masks" else "box"
            covered = len({cluster[i] for i in labeled})
            rows.append({"strategy": strategy if strategy == "random" or not args.tag else f"{strategy}+{args.tag}",
                         "seed": seed, "labeled": len(labeled), "steps": learner.steps,
                         "map50": scores_map[kind]["map50"], "map": scores_map[kind]["map"],
                         "clusters_covered": covered, "clusters": int(len(centroids)),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
            if b + 1 == len(args.budgets):
                break
            need = args.budgets[b + 1] - len(labeled)
            taken = set(labeled)
            left = [i for i in pool if i not in taken]
            if strategy == "random":
                labeled = labeled + rng.sample(left, need)
                continue
            measure = args.measure if strategy == "uncertainty" else args.cluster_measure
            weights = labeled_weights([data["examples"][i] for i in labeled], data["classes"])
            conf = confidences(learner.model, [data["examples"][i] for i in left], measure, weights)
            scores = dict(zip(left, conf))
            rows[-1]["pool_scores_iqr"] = round(float(np.subtract(*np.percentile(conf, [75, 25]))), 4)
            rows[-1]["measure"] = measure
            if strategy == "uncertainty":
                labeled = labeled + sorted(left, key=lambda i: (scores[i], i))[:need]
            else:
                labeled = labeled + pick_by_cluster(left, scores, cluster, labeled, need)
    return rows




def load(args) -> dict:
    classes, images = load_coco(args.data)
    task = "masks" if any(im.has_polygons for im in images) and not args.boxes else "boxes"
    settings = Settings.from_env({}, min_size=args.min_size, learning_rate=args.lr)
    starting = resolve_starting_weights(settings.arch_for(task) if task == "masks" else "fasterrcnn_lite0_fpn",
                                        download=False, task=task)
    train = {im.id: im for im in images if im.split == "train"}
    test = [im for im in images if im.split == "test"][: args.test_limit or None]
    probe = model_for_round(starting, None, tuple(classes), settings.min_size)
    limit = working_limit(probe)
    log.info("decoding %d train and %d test images at %s", len(train), len(test), limit)
    train_examples = Examples(list(train.values()), limit, task)
    examples = {im_id: item for im_id, item in zip(train, train_examples.items)}
    test_examples = Examples(test, limit, task)
    test_items = [(im.id, image_to_tensor(pil), target) for im, (pil, target) in zip(test, test_examples.items)]
    embedder = Embedder()
    embedding = {}
    for im_id, im in train.items():
        with Image.open(im.path) as opened:
            embedding[im_id] = embedder.embed([opened.convert("RGB")])[0]
    return {"classes": tuple(classes), "task": task, "settings": settings, "starting": starting,
            "train_ids": sorted(train), "examples": examples, "test": test_items, "embedding": embedding}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/datasets/bccd"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 40, 60, 80])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--steps-per-label", type=int, default=6)
    parser.add_argument("--pool", type=int, default=150, help="the unlabeled pool each seed draws from the train split")
    parser.add_argument("--min-size", type=int, default=0, help="0 = the architecture's working size")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--measure", default="least_confidence", choices=MEASURES, help="for 'uncertainty'")
    parser.add_argument("--cluster-measure", default="mean_confidence", choices=MEASURES,
                        help="for 'clusters' and 'typical'")
    parser.add_argument("--boxes", action="store_true", help="a polygon dataset as boxes (Faster R-CNN)")
    parser.add_argument("--test-limit", type=int, default=0, help="first N test images only (smoke runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="an ablation: the strategies other than random are reported as "
                        "STRATEGY+TAG (e.g. typical+class_weighted); random may then come from another run's JSON "
                        "with the same seeds and settings (mAP is a deterministic function of them)")
    parser.add_argument("--out", default="bench_active.json")
    parser.add_argument("--report", default=None, metavar="JSON", nargs="+",
                        help="print the tables of finished runs (several files: their seeds together)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="with --report: draw mAP@0.5 vs labels")
    args = parser.parse_args()
    if args.report:
        runs = [json.loads(Path(path).read_text()) for path in args.report]
        budgets = runs[0]["args"]["budgets"]
        same = ("budgets", "data", "pool", "steps_per_label", "min_size", "lr", "boxes", "test_limit")
        if any(run["args"].get(k) != runs[0]["args"].get(k) for run in runs for k in same):
            parser.error(f"--report: the runs differ in one of {', '.join(same)}")
        rows = [r for run in runs for r in run["rows"]]
        present = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
        present += sorted({r["strategy"] for r in rows} - set(present))  # ablations (--tag)
        for metric in ("map50", "map"):
            print(report(rows, budgets, present, metric) + "\n")
        iqr = {}
        for run in runs:
            for r in (r for r in run["rows"] if "pool_scores_iqr" in r):
                measure = r.get("measure") or run["args"]["measure" if r["strategy"] == "uncertainty" else "cluster_measure"]
                iqr.setdefault((r["strategy"], measure), []).append(r["pool_scores_iqr"])
        for (strategy, measure), values in iqr.items():
            print(f"pool score IQR, {strategy} ({measure}): median {statistics.median(values):.3f} "
                  f"over {len(values)} scorings")
        if args.plot:
            name = Path(runs[0]["args"]["data"]).name
            plot(rows, budgets, present, args.plot, f"{name}: labels vs test mAP")
        return
    if sorted(args.budgets) != args.budgets or len(set(args.budgets)) != len(args.budgets):
        parser.error("--budgets must be increasing")
    if "random" not in args.strategies:
        # random's rows are a deterministic function of the seeds and settings: a run without it (an ablation, or
        # strategies added to a finished run) is reported against another run's random with --report a.json b.json
        print("random is not in --strategies: report this run together with one that has it (--report)")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    data = load(args)
    if args.budgets[-1] > min(args.pool, len(data["train_ids"])):
        parser.error("the largest budget exceeds the pool")
    rows: list[dict] = []
    out = Path(args.out)
    for seed in args.seeds:
        rows += run_seed(seed, data, args)
        out.write_text(json.dumps({"args": vars(args), "task": data["task"], "rows": rows}, indent=1))
    for metric in ("map50", "map"):
        names = [s if s == "random" or not args.tag else f"{s}+{args.tag}" for s in args.strategies]
        print("\n" + report(rows, args.budgets, names, metric))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
