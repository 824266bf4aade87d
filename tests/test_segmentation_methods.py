"""The segmentation methods beyond pixel_kd and cwd: DIST on pixels, SKD's pair-wise term and IFVD, each
against a float64 reference written from the authors' code (values and gradients), and the feature methods
(FitNet, AT) on a segmenter's backbone stages with pixel-wise KD; then each one trained through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from kdrun import FAST, kd_here_ok, run_dirs, summary

from kd_cli.errors import KdError
from kd_cli.methods.ifvd import ifvd_loss
from kd_cli.methods.pixel_dist import pixel_dist_losses
from kd_cli.methods.seg_logits import pixel_kd_loss
from kd_cli.methods.skd import skd_pairwise_loss
from kd_cli.tasks import IGNORE_INDEX

# --- float64 references, written from the authors' code ------------------------------------------------


def dist_kd_segmentation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """hunto/DIST_KD segmentation/losses/dist_kd.py, DIST(beta=1, gamma=1) on 4-d logits: pixels to rows
    (their transpose(1, 3) order), softmax, 1 - mean Pearson over rows + 1 - mean Pearson over columns,
    the Pearson as they write it (eps added to the product of the norms)."""

    def pearson(x, y, eps=1e-8):
        x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + eps)

    classes = y_s.shape[1]
    p_s = y_s.transpose(1, 3).reshape(-1, classes).softmax(dim=1)
    p_t = y_t.transpose(1, 3).reshape(-1, classes).softmax(dim=1)
    return (1 - pearson(p_s, p_t).mean()) + (1 - pearson(p_s.T, p_t.T).mean())


def cirkd_structural_kd(feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """CIRKD losses/skd.py, CriterionStructuralKD: 2x2 max-pool (ceil mode), L2-normalise over channels,
    bmm(f^T, f) per image, mean squared difference."""
    pool = torch.nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=0, ceil_mode=True)

    def similarity(feat):
        feat = F.normalize(pool(feat), p=2, dim=1)
        flat = feat.reshape(feat.shape[0], feat.shape[1], -1)
        return torch.bmm(flat.transpose(1, 2), flat)

    return ((similarity(feat_s) - similarity(feat_t)) ** 2).mean()


def cirkd_ifv(feat_s: torch.Tensor, feat_t: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """CIRKD losses/ifvd.py, CriterionIFV: the target resized (nearest) to the feature size, each class's
    mean feature replacing its pixels' centre one class at a time, cosine to the centre, MSE."""
    size = feat_s.shape[2:]
    tar = F.interpolate(target.unsqueeze(1).float(), size=size, mode="nearest")
    tar_s, tar_t = tar.expand(feat_s.size()), tar.expand(feat_t.size())
    centre_s, centre_t = feat_s.clone(), feat_t.clone()
    for i in range(classes):
        mask_s, mask_t = (tar_s == i).double(), (tar_t == i).double()
        mean_s = (mask_s * feat_s).sum(-1).sum(-1) / (mask_s.sum(-1).sum(-1) + 1e-6)
        mean_t = (mask_t * feat_t).sum(-1).sum(-1) / (mask_t.sum(-1).sum(-1) + 1e-6)
        centre_s = (1 - mask_s) * centre_s + mask_s * mean_s[..., None, None]
        centre_t = (1 - mask_t) * centre_t + mask_t * mean_t[..., None, None]
    cos = torch.nn.CosineSimilarity(dim=1)
    return torch.nn.MSELoss()(cos(feat_s, centre_s), cos(feat_t, centre_t))


def _grad(loss_of, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    student = student.clone().requires_grad_(True)
    value = loss_of(student)
    value.backward()
    return value.detach(), student.grad


def _maps(seed: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 for _ in range(2))


def test_pixel_dist_equals_the_authors_segmentation_dist():
    student, teacher = _maps(0, (2, 5, 6, 7))
    ours = _grad(lambda s: sum(pixel_dist_losses(s, teacher, 1.0)), student)
    theirs = _grad(lambda s: dist_kd_segmentation(s, teacher), student)
    assert torch.allclose(ours[0], theirs[0], atol=1e-7) and torch.allclose(ours[1], theirs[1], atol=1e-7)
    inter, intra = pixel_dist_losses(teacher, teacher, 1.0)
    assert abs(float(inter)) < 1e-12 and abs(float(intra)) < 1e-12


@pytest.mark.parametrize("size", [(8, 8), (7, 5)])  # an odd map: ceil-mode pooling's partial cells
def test_skd_pairwise_equals_cirkd(size):
    student, teacher = _maps(1, (2, 6, *size))
    teacher = teacher[:, :4]  # another channel count: an affinity has none
    ours = _grad(lambda s: skd_pairwise_loss(s, teacher, patch=2), student)
    theirs = _grad(lambda s: cirkd_structural_kd(s, teacher), student)
    assert torch.allclose(ours[0], theirs[0], atol=1e-12) and torch.allclose(ours[1], theirs[1], atol=1e-12)


def test_ifvd_equals_cirkd_with_ignored_and_absent_classes():
    student, teacher = _maps(2, (2, 6, 6, 8))
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (2, 12, 16), generator=generator)  # classes 4 and 5 absent
    target[0, :4] = IGNORE_INDEX
    ours = _grad(lambda s: ifvd_loss(s, teacher, target, 6), student)
    theirs = _grad(lambda s: cirkd_ifv(s, teacher, target, 6), student)
    assert torch.allclose(ours[0], theirs[0], atol=1e-12) and torch.allclose(ours[1], theirs[1], atol=1e-12)
    assert float(ours[0]) > 0 and float(ifvd_loss(teacher, teacher, target, 6)) == 0


def test_a_teacher_map_of_another_size_is_resized_to_the_students():
    student, teacher = _maps(4, (1, 3, 8, 8))
    coarse = F.avg_pool2d(teacher, 2)
    resized = F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(skd_pairwise_loss(student, coarse), skd_pairwise_loss(student, resized))
    target = torch.randint(0, 3, (1, 8, 8))
    assert torch.equal(ifvd_loss(student, coarse, target, 3), ifvd_loss(student, resized, target, 3))


def test_feature_methods_distil_a_segmenter_pixel_wise():
    """FitNet's kd term on per-pixel logits is pixel_kd's loss over the labelled pixels, its ce the task's."""
    from kd_cli.methods import build_method
    from kd_cli.models import create_model

    student = create_model("segcnn_tiny", num_classes=4, in_channels=1, input_size=16)
    teacher = create_model("segcnn", num_classes=4, in_channels=1, input_size=16).eval()
    options = {
        "name": "fitnet",
        "student_layers": None,
        "teacher_layers": None,
        "fitnet_weight": 1.0,
        "regressor_relu": True,
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "temperature": 2.0,
    }
    method = build_method(options, student, teacher, task="segmentation")
    images, masks = torch.randn(2, 1, 16, 16), torch.randint(0, 4, (2, 16, 16))
    masks[0, 0] = IGNORE_INDEX
    logits, terms = method(images, masks)
    with torch.no_grad():
        expected = pixel_kd_loss(logits, teacher(images), 2.0, masks != IGNORE_INDEX)
    assert torch.allclose(terms["kd"], expected)
    assert torch.allclose(terms["ce"], F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX))


def test_an_affinity_too_large_for_memory_is_refused_with_the_patch_that_fits():
    from kd_cli.methods import build_method
    from kd_cli.models import create_model

    student = create_model("segcnn_tiny", num_classes=3, in_channels=1, input_size=160)
    teacher = create_model("segcnn_tiny", num_classes=3, in_channels=1, input_size=160)
    options = {
        "name": "skd",
        "student_layers": None,
        "teacher_layers": None,
        "skd_weight": 1.0,
        "patch": 2,
        "ce_weight": 1.0,
        "kd_weight": 0.0,
        "temperature": 1.0,
    }
    with pytest.raises(KdError, match=r"160x160; in 2x2 cells that is 6400 cells.*set method.patch=3"):
        build_method(options, student, teacher, task="segmentation")


# The CLI runs below share scenes and one teacher (trained once, in this process).
SCENES = ["dataset=digit_scenes", "dataset.train_scenes=32", "dataset.test_scenes=16", "dataset.canvas=32"]


@pytest.fixture(scope="module")
def scene_teacher(tmp_path_factory):
    work = tmp_path_factory.mktemp("scene_teacher")
    teacher = ["teacher.arch=segcnn_tiny", "trainer.epochs=1", "trainer.batch_size=16"]
    kd_here_ok("train-teacher", *SCENES, *teacher, f"hydra.run.dir={work / 'teacher'}", *FAST, cwd=work)
    return [*SCENES, f"teacher.checkpoint={work / 'teacher'}"]


@pytest.mark.parametrize("method", ["pixel_dist", "skd", "ifvd", "cirkd", "fitnet", "at", None])
def test_each_segmentation_method_trains_through_the_cli(method, scene_teacher, tmp_path):
    """None: no method on the command line, so the default `kd` becomes its segmentation counterpart."""
    chosen = [f"method={method}"] if method else []
    if method == "cirkd":  # (its pixel pairs grow with the batch squared: a small one shows every term)
        chosen += ["trainer.max_steps_per_epoch=1", "trainer.batch_size=4"]
    kd_here_ok("distill", *scene_teacher, "trainer.epochs=1", "trainer.batch_size=16", *chosen, *FAST, cwd=tmp_path)
    (run,) = run_dirs(tmp_path / "outputs", "distill")
    header = (run / "metrics.csv").read_text().splitlines()[0]
    own = {"pixel_dist": "train_inter", "skd": "train_skd", "ifvd": "train_ifvd", "fitnet": "train_fitnet"}
    own["cirkd"] = "train_memory_region"
    expected = own.get(method, "train_at") if method else "train_kd"
    assert expected in header and "test_miou" in header
    assert summary(run)["method"] == (method or "pixel_kd")


# --- segmentation-models-pytorch ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, encoder, stages",
    [
        ("smp/unet", "resnet18", ["encoder.layer1", "encoder.layer2", "encoder.layer3", "encoder.layer4"]),
        (
            "smp/fpn",
            "mobilenet_v2",
            ["encoder.features.3", "encoder.features.6", "encoder.features.13", "encoder.features.18"],
        ),
    ],
)
def test_smp_models_with_their_encoders_give_pixel_logits_and_stage_features(arch, encoder, stages):
    pytest.importorskip("segmentation_models_pytorch")
    from kd_cli.models import create_model, model_task
    from kd_cli.models.features import FeatureTap

    model = create_model(arch, num_classes=5, in_channels=1, input_size=64, encoder=encoder).eval()
    assert model_task(arch) == "segmentation" and model.kd_feature_layers == stages
    with FeatureTap(model, [*stages, model.kd_embedding_layer]) as tap, torch.no_grad():
        logits = model(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 5, 64, 64)
    assert [tap.outputs[name].shape[-1] for name in stages] == [16, 8, 4, 2]  # 1/4 down to 1/32, block outputs
    assert tap.outputs["decoder"].dim() == 4


def test_smp_names_and_offline_weights_are_one_line(monkeypatch):
    pytest.importorskip("segmentation_models_pytorch")
    from kd_cli.models import create_model, smp_models

    with pytest.raises(KdError, match=r"unknown smp architecture 'unett'; did you mean smp/unet"):
        create_model("smp/unett", 5, 1, 64)
    with pytest.raises(KdError, match=r"unknown smp encoder 'resnet19'; did you mean resnet18"):
        create_model("smp/unet", 5, 1, 64, encoder="resnet19")
    monkeypatch.setattr(smp_models, "reachable", lambda host: False)
    with pytest.raises(KdError, match=r"no ImageNet weights for smp encoder resnet18 in the local cache"):
        create_model("smp/unet", 5, 3, 64, encoder="resnet18", pretrained_backbone=True)


def test_distill_into_an_smp_unet(scene_teacher, tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    kd_here_ok(
        "distill",
        *scene_teacher,
        "student.arch=smp/unet",
        "+student.kwargs.encoder=resnet18",
        "method=skd",
        "method.patch=4",
        "trainer.epochs=1",
        "trainer.batch_size=8",
        *FAST,
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path / "outputs", "distill")
    assert summary(run)["status"] == "complete" and summary(run)["arch"] == "smp/unet"
    kd_here_ok("evaluate", f"run={run}", "latency_batches=1", *FAST, cwd=tmp_path)


# --- CIRKD ----------------------------------------------------------------------------------------------


def cirkd_minibatch(feat_s: torch.Tensor, feat_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """CIRKD losses/cirkd_mini_batch.py, CriterionMiniBatchCrossImagePair (no pooling): every ordered image
    pair's pixel-by-pixel similarity, KL(softmax_t || log_softmax_s) with reduction batchmean, over B^2."""
    batch = feat_s.shape[0]
    feat_s, feat_t = F.normalize(feat_s, p=2, dim=1), F.normalize(feat_t, p=2, dim=1)
    total = torch.zeros((), dtype=feat_s.dtype)
    for i in range(batch):
        for j in range(batch):
            s = torch.mm(feat_s[i].reshape(feat_s.shape[1], -1).T, feat_s[j].reshape(feat_s.shape[1], -1))
            t = torch.mm(feat_t[i].reshape(feat_t.shape[1], -1).T, feat_t[j].reshape(feat_t.shape[1], -1))
            total = total + F.kl_div(
                F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean"
            )
    return total / batch**2


def cirkd_memory(s_proj, t_feats, labels, queues, pixel_size, region_size, t_c, t_kd):
    """CIRKD losses/cirkd_memory.py, StudentSegContrast.forward after its projection head (given s_proj),
    on copies of the queues; its pixel enqueue indexes the class's own pixels (see ClassQueues.push)."""
    pixel_q, pixel_ptr = queues.pixel_queue.clone(), queues.pixel_ptr.clone()
    region_q, region_ptr = queues.region_queue.clone(), queues.region_ptr.clone()
    t_feats, s_feats = F.normalize(t_feats, p=2, dim=1), F.normalize(s_proj, p=2, dim=1)
    labels = F.interpolate(labels[:, None].float(), s_feats.shape[2:], mode="nearest")[:, 0].long()
    for bs in range(t_feats.shape[0]):
        feat, label = t_feats[bs].reshape(t_feats.shape[1], -1), labels[bs].reshape(-1)
        for lb in [x for x in torch.unique(label) if x != IGNORE_INDEX]:
            idxs = (label == lb).nonzero()
            region_q[lb, int(region_ptr[lb])] = F.normalize(feat[:, idxs].mean(dim=1).squeeze(1), p=2, dim=0)
            region_ptr[lb] = (region_ptr[lb] + 1) % region_q.shape[1]
            perm = torch.randperm(idxs.shape[0])
            k = min(idxs.shape[0], 16)
            chosen = F.normalize(feat[:, idxs[perm[:k], 0]].T, p=2, dim=1)
            ptr = int(pixel_ptr[lb])
            if ptr + k >= pixel_q.shape[1]:
                pixel_q[lb, -k:], pixel_ptr[lb] = chosen, 0
            else:
                pixel_q[lb, ptr : ptr + k], pixel_ptr[lb] = chosen, (ptr + k) % pixel_q.shape[1]
    keep = labels.reshape(-1) != IGNORE_INDEX
    s_rows = s_feats.permute(0, 2, 3, 1).reshape(-1, s_feats.shape[1])[keep]
    t_rows = t_feats.permute(0, 2, 3, 1).reshape(-1, t_feats.shape[1])[keep]

    def kd(s_logits, t_logits):
        return (
            F.kl_div(F.log_softmax(s_logits / t_kd, 1), F.softmax(t_logits / t_kd, 1), reduction="batchmean") * t_kd**2
        )

    out = []
    for queue, size in ((pixel_q, pixel_size), (region_q, region_size)):
        index = torch.randperm(queue.shape[1])[:size]
        contrast = queue[:, index, :].reshape(-1, queue.shape[2])
        out.append(kd(s_rows @ contrast.T / t_c, t_rows @ contrast.T / t_c))
    return out, (pixel_q, region_q)


def test_cirkd_minibatch_term_equals_the_authors():
    from kd_cli.methods.cirkd import minibatch_pair_loss

    student, teacher = _maps(5, (3, 4, 5, 6))
    teacher = teacher[:, :3]
    ours = _grad(lambda s: minibatch_pair_loss(s, teacher, 0.1), student)
    theirs = _grad(lambda s: cirkd_minibatch(s, teacher, 0.1), student)
    assert torch.allclose(ours[0], theirs[0], atol=1e-10) and torch.allclose(ours[1], theirs[1], atol=1e-10)


def test_cirkd_memory_terms_equal_the_authors_with_the_same_draws():
    from kd_cli.methods import build_method
    from kd_cli.models import create_model

    torch.manual_seed(0)
    student = create_model("segcnn_tiny", num_classes=4, in_channels=1, input_size=12).double()
    teacher = create_model("segcnn", num_classes=4, in_channels=1, input_size=12).double().eval()
    options = {
        "name": "cirkd",
        "student_layers": None,
        "teacher_layers": None,
        "minibatch_weight": 0.0,
        "memory_pixel_weight": 1.0,
        "memory_region_weight": 1.0,
        "contrast_temperature": 0.1,
        "contrast_kd_temperature": 2.0,
        "pixel_memory": 50,
        "region_memory": 7,
        "pixel_contrast": 12,
        "region_contrast": 8,
        "ce_weight": 0.0,
        "kd_weight": 0.0,
        "temperature": 1.0,
    }
    method = build_method(options, student, teacher, task="segmentation").double()
    s_map, t_map = _maps(6, (2, 8, 12, 12))
    t_map = t_map.repeat(1, 4, 1, 1)  # the teacher is 4x as wide
    labels = torch.randint(0, 4, (2, 12, 12), generator=torch.Generator().manual_seed(7))
    labels[0, :3] = IGNORE_INDEX
    s_proj = method.project(s_map)
    torch.manual_seed(1)
    (pixel_ref, region_ref), (pixel_q, region_q) = cirkd_memory(
        s_proj, t_map, labels, method.queues, 12 // 4 + 1, 8 // 4 + 1, 0.1, 2.0
    )
    torch.manual_seed(1)
    pixel, region = method.memory_terms(s_map, t_map, labels)
    assert torch.allclose(pixel, pixel_ref, atol=1e-10) and torch.allclose(region, region_ref, atol=1e-10)
    assert torch.equal(method.queues.pixel_queue, pixel_q) and torch.equal(method.queues.region_queue, region_q)
    assert float(pixel.detach()) > 0 and float(region.detach()) > 0


# --- torchvision's auxiliary heads --------------------------------------------------------------------------


def test_an_aux_head_runs_in_training_only_and_leaves_the_main_logits_unchanged():
    from kd_cli.models import create_model

    torch.manual_seed(0)
    model = create_model("deeplabv3_mobilenet_v3_large", num_classes=4, in_channels=3, input_size=32, aux_loss=True)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model.net(x)["out"], atol=1e-6)  # torchvision's own forward
    assert "kd_aux_logits" not in model.__dict__
    model.train()
    model(x)
    aux = model.__dict__["kd_aux_logits"]
    assert aux.shape == (2, 4, 32, 32) and aux.requires_grad
    with pytest.raises(KdError, match="unknown option.*aux_loss"):
        create_model("lraspp_mobilenet_v3_large", 4, 3, 32, aux_loss=True)


def test_a_student_with_an_aux_head_trains_it_beside_any_method(scene_teacher, tmp_path):
    kd_here_ok(
        "distill",
        *scene_teacher,
        "student.arch=deeplabv3_mobilenet_v3_large",
        "student.kwargs.aux_loss=true",
        "method=cwd",
        "trainer.epochs=1",
        "trainer.batch_size=8",
        *FAST,
        cwd=tmp_path,
    )
    (run,) = run_dirs(tmp_path / "outputs", "distill")
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "train_aux" in header and "train_cwd" in header
    kd_here_ok("evaluate", f"run={run}", "latency_batches=1", *FAST, cwd=tmp_path)
    shrink = ["compression=prune_structured", "trainer.epochs=1", "trainer.batch_size=8", "latency_batches=1"]
    kd_here_ok("compress", f"run={run}", *shrink, *FAST, cwd=tmp_path)  # pruned without its aux head
    (compressed,) = run_dirs(tmp_path / "outputs", "compress")
    assert summary(compressed)["params_ratio"] < 1
    assert json.loads((compressed / "model.json").read_text())["kwargs"]["aux_loss"] is False
