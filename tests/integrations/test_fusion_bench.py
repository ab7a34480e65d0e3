"""dawin-ext's fusion_bench algorithms, run through fusion_bench itself on a tiny offline model pool.

The pool is local ``save_pretrained`` directories of random-init tiny HF CLIP models (a ``CLIPModel`` with its
processor as ``_pretrained_``, ``CLIPVisionModel`` fine-tunes) and tiny generated image datasets saved with
``datasets.save_to_disk``; nothing is downloaded (``HF_HUB_OFFLINE=1``). Each method runs through fusion_bench's
``fusion_bench`` command (Hydra, our configs found through ``hydra.searchpath``) and its result, saved by
fusion_bench's ``merged_model_save_path``, is compared with a direct dawin-ext call on the same weights.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("fusion_bench", reason="fusion_bench is not installed (pip install 'dawin-ext[fusion_bench]')")
datasets = pytest.importorskip("datasets")

from eval_setup import CLASSNAMES, images, tiny_hf_clip, vision_tower  # noqa: E402
from PIL import Image  # noqa: E402

from dawin_ext import DaWin, DaWinMultiTask, wise_ft  # noqa: E402
from dawin_ext.integrations import fusion_bench as fb  # noqa: E402
from dawin_ext.integrations import hf_clip  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["tiny_a", "tiny_b"]
FUSION_BENCH = shutil.which("fusion_bench")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Writes the pool's directories and a modelpool config; returns paths and the direct-call ingredients."""
    tmp = tmp_path_factory.mktemp("fusion_bench")
    clip = tiny_hf_clip(seed=0)
    cfg = clip.config
    tokenizer = hf_clip.clip_tokenizer_from_open_clip(tmp / "bpe")
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    pre = tmp / "pretrained"
    clip.save_pretrained(pre)
    processor.save_pretrained(pre)
    # Fine-tuned image towers: the pretrained tower plus a different random direction each, large enough that the
    # entropies, and so the coefficients, spread across samples.
    fts = {}
    for i, name in enumerate(["ft_a", "ft_b"]):
        vision = transformers.CLIPVisionModel(cfg.vision_config)
        g = torch.Generator().manual_seed(10 + i)
        sd = {
            k: v + 0.5 * v.std().nan_to_num(0.1) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in clip.vision_model.state_dict().items()
        }
        vision_tower(vision).load_state_dict(sd)
        vision.save_pretrained(tmp / name)
        fts[name] = tmp / name
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSNAMES)})
    data = {}
    for i, task in enumerate(TASKS):
        items = [(c, Image.fromarray(img)) for c, _, img in images(20 + i, 8, 60.0 + 60 * i)]
        ds = datasets.Dataset.from_dict(
            {"image": [im for _, im in items], "label": [c for c, _ in items]}, features=features
        )
        ds.save_to_disk(str(tmp / task))
        data[task] = tmp / task
    conf = tmp / "conf" / "modelpool"
    conf.mkdir(parents=True)

    def write_pool(name: str, models: dict) -> None:
        lines = [
            "_target_: fusion_bench.modelpool.CLIPVisionModelPool",
            "_recursive_: false",
            f"processor: {pre}",
            "platform: hf",
            "models:",
            f"  _pretrained_: {pre}",
            *[f"  {k}: {v}" for k, v in models.items()],
            "test_datasets:",
        ]
        for task in TASKS:
            lines += [f"  {task}:", "    _target_: datasets.load_from_disk", f"    dataset_path: {data[task]}"]
        (conf / f"{name}.yaml").write_text("\n".join(lines) + "\n")

    write_pool("tiny_pair", {"ft_a": fts["ft_a"]})
    write_pool("tiny_multi", fts)
    return {"tmp": tmp, "pre": pre, "fts": fts, "data": data, "conf": tmp / "conf"}


def _run_fusion_bench(pool, *overrides: str) -> subprocess.CompletedProcess:
    if FUSION_BENCH is None:
        pytest.skip("the fusion_bench command is not on PATH")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        FUSION_BENCH_PROJECT_ROOT=str(pool["tmp"]),
        OMP_NUM_THREADS="1",
    )
    cmd = [
        FUSION_BENCH,
        "--config-dir",
        str(pool["conf"]),
        f"hydra.searchpath=[{fb.SEARCHPATH}]",
        "fabric.accelerator=cpu",
        "fabric.loggers=null",
        "print_config=false",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=pool["tmp"])
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


# -------------------------------------------------------------------------------------- direct dawin-ext calls
def _load(pool):
    clip = hf_clip.load_hf_clip(pool["pre"])
    processor = transformers.CLIPProcessor.from_pretrained(str(pool["pre"]), local_files_only=True)
    return clip, processor


def _batches(pool, processor, task, batch=64):
    ds = datasets.load_from_disk(str(pool["data"][task]))
    x = torch.stack(
        [processor(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"][0] for im in ds["image"]]
    )
    return list(x.split(batch))


def _classifier(clip, processor, tower):
    w, b = hf_clip.build_hf_zero_shot_head(clip, processor.tokenizer, CLASSNAMES, "classname")
    return hf_clip.HFCLIPClassifier(copy.deepcopy(tower), copy.deepcopy(clip.visual_projection), w, b, CLASSNAMES)


def _sd(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


DAWIN_OVERRIDES = [
    "method.templates=classname",
    "method.classnames={tiny_a:[zebra,apple,kite],tiny_b:[zebra,apple,kite]}",
]


# -------------------------------------------------------------------------------------- tests
def test_wise_ft_through_fusion_bench_equals_dawin_ext(pool):
    out = pool["tmp"] / "merged_wise"
    _run_fusion_bench(
        pool, "method=dawin/wise_ft", "method.alpha=0.3", "modelpool=tiny_pair", f"merged_model_save_path={out}"
    )
    merged = transformers.CLIPVisionModel.from_pretrained(str(out), local_files_only=True).state_dict()
    pre = transformers.CLIPVisionModel.from_pretrained(str(pool["pre"]), local_files_only=True).state_dict()
    ft = transformers.CLIPVisionModel.from_pretrained(str(pool["fts"]["ft_a"]), local_files_only=True).state_dict()
    direct = wise_ft(pre, ft, 0.3)
    assert merged.keys() == direct.keys()
    for k in direct:
        torch.testing.assert_close(merged[k], direct[k], rtol=0, atol=0, msg=lambda e, k=k: f"{k}: {e}")
        if direct[k].is_floating_point():  # and the formula itself
            torch.testing.assert_close(merged[k], 0.7 * pre[k] + 0.3 * ft[k], rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(merged[k], pre[k]) for k in pre if pre[k].is_floating_point())


def _assert_same_clusters(labels_a, labels_b, centres_a, centres_b):
    """The same partition of the samples and the same cluster centres, up to the clusters' order: a mixture fitted
    on coefficients that differ by ~1e-5 (another process, another transformers) may number its clusters
    differently (seen under transformers 4.57)."""
    mapping = {}
    for a, b in zip(labels_a.tolist(), labels_b.tolist(), strict=True):
        assert mapping.setdefault(a, b) == b, f"cluster {a} holds samples of clusters {mapping[a]} and {b}"
    assert len(set(mapping.values())) == len(mapping), f"two clusters merged: {mapping}"
    used = sorted(mapping)
    torch.testing.assert_close(centres_a[used], centres_b[[mapping[a] for a in used]], rtol=0, atol=1e-4)


def test_dawin_through_fusion_bench_equals_dawin_ext(pool):
    # The fit (what is saved) does not depend on the mode; the exact mode's outputs are checked in process below.
    mode = "exact"
    out = pool["tmp"] / f"merged_dawin_{mode}"
    _run_fusion_bench(
        pool,
        "method=dawin/dawin",
        f"method.mode={mode}",
        "modelpool=tiny_pair",
        f"merged_model_save_path={out}",
        *DAWIN_OVERRIDES,
    )
    meta = json.loads((out / "dawin_fusion.json").read_text())
    assert meta == {"method": "dawin/dawin", "mode": mode, "tasks": TASKS}
    clip, processor = _load(pool)
    ft_vision = hf_clip.load_hf_clip(pool["fts"]["ft_a"])
    zs = _classifier(clip, processor, clip.vision_model)
    ft = _classifier(clip, processor, vision_tower(ft_vision))
    for task in TASKS:
        batches = _batches(pool, processor, task)
        direct = DaWin(zs, _sd(zs), _sd(ft), n_clusters=3, seed=1).fit(batches)
        # Loading checks the saved content hashes of theta_zs and theta_ft: fusion_bench's run used these weights.
        saved = DaWin.load(out / task, zs, _sd(zs), _sd(ft))
        # 1e-4: fusion_bench's run is another process on its own model loading; under transformers 4.57 its
        # entropies differed from this process's by up to 3e-5 (1e-5 held under transformers 5).
        torch.testing.assert_close(saved.coefficients_, direct.coefficients_, rtol=0, atol=1e-4)
        _assert_same_clusters(saved.labels_, direct.labels_, saved.cluster_coefficients_, direct.cluster_coefficients_)
        assert float(direct.coefficients_.max() - direct.coefficients_.min()) > 1e-3  # lambda really varies


def test_dawin_multitask_through_fusion_bench_equals_dawin_ext(pool):
    out = pool["tmp"] / "merged_mt"
    _run_fusion_bench(
        pool,
        "method=dawin/dawin_multitask",
        "method.n_clusters=2",
        "modelpool=tiny_multi",
        f"merged_model_save_path={out}",
        *DAWIN_OVERRIDES,
    )
    clip, processor = _load(pool)
    base = fb._Pooled(copy.deepcopy(clip.vision_model))
    thetas = [_sd(fb._Pooled(vision_tower(hf_clip.load_hf_clip(p)))) for p in pool["fts"].values()]
    for task in TASKS:
        w, b = hf_clip.build_hf_zero_shot_head(clip, processor.tokenizer, CLASSNAMES, "classname")
        head = fb._ProjectedHead(clip.visual_projection, w, b)
        batches = _batches(pool, processor, task)
        direct = DaWinMultiTask(base, _sd(base), thetas, head=head, n_clusters=2, seed=0).fit(batches)
        saved = DaWinMultiTask.load(out / task, base, _sd(base), thetas, head=head)
        torch.testing.assert_close(saved.pi_, direct.pi_, rtol=0, atol=1e-4)  # as the coefficients above
        _assert_same_clusters(saved.labels_, direct.labels_, saved.cluster_pi_, direct.cluster_pi_)
        assert float((direct.pi_ - direct.pi_.mean(0)).abs().max()) > 1e-3  # pi really varies per sample


@pytest.fixture(scope="module")
def fb_pool(pool):
    """The same pool as a fusion_bench CLIPVisionModelPool object (in process)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(pool["conf"] / "modelpool" / "tiny_multi.yaml")
    from fusion_bench.modelpool import CLIPVisionModelPool

    return CLIPVisionModelPool(cfg.models, processor=cfg.processor, test_datasets=cfg.test_datasets)


@pytest.mark.parametrize("mode", ["cluster", "exact"])
def test_returned_module_in_fusion_bench_classifier_equals_dawin_predict(pool, fb_pool, mode):
    """The returned module inside fusion_bench's own HFCLIPClassifier, set up as its CLIP task pool does
    (``clip_model.vision_model = merged``; ``set_classification_task``), gives dawin-ext's DaWin predictions."""
    from fusion_bench.models.hf_clip import HFCLIPClassifier as FBClassifier

    algo = fb.DaWinAlgorithm(
        mode=mode, finetuned="ft_a", templates="classname", classnames=dict.fromkeys(TASKS, CLASSNAMES)
    )
    merged = algo.run(fb_pool)
    assert isinstance(merged, fb.DaWinCLIPVisionModel) and merged.tasks == TASKS
    clip, processor = _load(pool)
    fb_clf = FBClassifier(copy.deepcopy(clip), processor)
    fb_clf.clip_model.vision_model = merged
    fb_clf.set_classification_task(CLASSNAMES, ["{}".format])
    x = torch.cat(_batches(pool, processor, "tiny_b"))
    with pytest.raises(RuntimeError, match="call set_task"):
        fb_clf(x)
    merged.set_task("tiny_b")
    got = fb_clf(x)
    direct = merged.fitted["tiny_b"]
    torch.testing.assert_close(got, direct.predict(x, mode=mode), rtol=1e-4, atol=1e-4)
    # and per-sample merges by hand: sample i under its coefficient (its cluster's, or its own)
    zs, ft = direct.theta_zs, direct.theta_ft
    lam = direct.coefficients(x)
    if mode == "cluster":
        lam = direct.cluster_coefficients_[direct.assign(lam)]
    ref = torch.cat(
        [
            torch.func.functional_call(direct.model, {k: (1 - a) * zs[k] + a * ft[k] for k in zs}, (x[i : i + 1],))
            for i, a in enumerate(lam.tolist())
        ]
    )
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="was not fitted"):
        merged.set_task("cifar10")


def test_task_pool_sets_the_task(fb_pool):
    try:
        pool_cls = fb.DaWinCLIPVisionModelTaskPool
    except ImportError as e:
        pytest.skip(f"fusion_bench's CLIP task pool does not import with this transformers: {e}")
    merged = fb.DaWinAlgorithm(
        finetuned="ft_a", templates="classname", classnames=dict.fromkeys(TASKS, CLASSNAMES)
    ).run(fb_pool)
    taskpool = object.__new__(pool_cls)  # only the hook runs: no datasets or models to set up
    taskpool.layer_wise_feature_save_path = None
    classifier = torch.nn.Module()
    classifier.vision_model = merged
    for task in reversed(TASKS):
        taskpool.on_task_evaluation_begin(classifier, task)
        assert merged.task == task


def test_bad_pools_are_named(fb_pool, monkeypatch):
    from fusion_bench.tasks.clip_classification import CLIPTemplateFactory

    # Earlier runs registered the tiny tasks' class names (as the plugin does for fusion_bench's task pool).
    registry = {k: v for k, v in CLIPTemplateFactory._dataset_mapping.items() if k not in TASKS}
    monkeypatch.setattr(CLIPTemplateFactory, "_dataset_mapping", registry)
    with pytest.raises(ValueError, match="holds 2 fine-tuned models"):
        fb.DaWinAlgorithm(templates="classname").run(fb_pool)
    with pytest.raises(ValueError, match="no class names for task 'tiny_a'"):
        fb.DaWinAlgorithm(finetuned="ft_a", templates="classname").run(fb_pool)
    with pytest.raises(ValueError, match="'nope' is not among the pool's test_datasets"):
        fb.DaWinAlgorithm(finetuned="ft_a", tasks=["nope"]).run(fb_pool)
    with pytest.raises(ValueError, match="mode must be 'cluster' or 'exact'"):
        fb.DaWinAlgorithm(mode="soft")


def test_mismatched_architectures_are_named(pool):
    from fusion_bench.modelpool import CLIPVisionModelPool
    from omegaconf import OmegaConf

    vision = transformers.CLIPVisionModel.from_pretrained(str(pool["fts"]["ft_a"]), local_files_only=True)
    vision.config.hidden_act = "quick_gelu"  # same weights, another activation: shapes alone would not tell
    quick = pool["tmp"] / "ft_quick"
    vision.save_pretrained(quick)
    cfg = OmegaConf.load(pool["conf"] / "modelpool" / "tiny_pair.yaml")
    models = OmegaConf.create({"_pretrained_": str(pool["pre"]), "ft_quick": str(quick)})
    bad = CLIPVisionModelPool(models, processor=cfg.processor, test_datasets=cfg.test_datasets)
    kwargs = {"templates": "classname", "classnames": dict.fromkeys(TASKS, CLASSNAMES)}
    for algo in (fb.DaWinAlgorithm(**kwargs), fb.DaWinMultiTaskAlgorithm(**kwargs)):
        with pytest.raises(ValueError, match="vision config hidden_act is 'gelu' in the '_pretrained_'"):
            algo.run(bad)


def test_core_import_stays_free_of_fusion_bench_and_names_the_extra():
    code = (
        "import sys, dawin_ext; assert 'fusion_bench' not in sys.modules\n"
        "sys.modules['fusion_bench'] = None\n"
        "try:\n    import dawin_ext.integrations.fusion_bench\nexcept ImportError as e:\n    print(e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'dawin-ext[fusion_bench]'" in proc.stdout
