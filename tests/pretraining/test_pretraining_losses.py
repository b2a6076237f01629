"""The pretraining losses compute DINOv3's functions: compared with the official modules' outputs on fixed tensors
(../shared/fixtures/dinov3_losses, within 1e-5 relative)."""
import numpy as np
import pytest
import torch

from meddinov3_nnunet.pretraining.losses import (GramLoss, dino_cross_entropy, ibot_masked_cross_entropy, koleo_loss,
                                                 sinkhorn_knopp)
from meddinov3_nnunet.pretraining.config import available_configs, load_config
from meddinov3_nnunet.pretraining.model import DINOHead

RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(shared_dir):
    return torch.load(shared_dir / "fixtures" / "dinov3_losses" / "dinov3_losses.expected.pt", weights_only=True)


def assert_close(actual, expected):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=RTOL, atol=1e-7)


def test_sinkhorn_knopp_centring_of_the_dino_teacher_matches_dinov3(reference):
    ref = reference["dino"]
    probs = sinkhorn_knopp(ref["teacher_logits"], ref["teacher_temp"], ref["sk_iterations"])
    assert_close(probs.unflatten(0, (2, 4)), ref["teacher_probs_sinkhorn"])
    torch.testing.assert_close(probs.sum(-1), torch.ones(8))  # every sample is a distribution


def test_sinkhorn_knopp_does_not_overflow_where_a_plain_exp_would():
    logits = torch.tensor([[10.0, 0.0, -3.0], [9.0, 1.0, 0.0]])  # exp(10 / 0.04) is inf in float32, exp(-3 / 0.04) tiny
    assert torch.isinf(torch.exp(logits / 0.04)).any()
    probs = sinkhorn_knopp(logits, 0.04, 3)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_dino_global_loss_without_same_crop_pairs_matches_dinov3(reference):
    ref = reference["dino"]
    loss = dino_cross_entropy(ref["student_global_logits"], ref["teacher_probs_sinkhorn"], ref["student_temp"],
                              ignore_diagonal=True)
    assert_close(loss, ref["loss_global_ignore_diagonal"])


def test_dino_local_loss_matches_dinov3(reference):
    ref = reference["dino"]
    loss = dino_cross_entropy(ref["student_local_logits"], ref["teacher_probs_sinkhorn"], ref["student_temp"])
    assert_close(loss, ref["loss_local"])


def test_ibot_sinkhorn_knopp_and_masked_loss_match_dinov3(reference):
    ref = reference["ibot"]
    masks = ref["masks"]
    probs = sinkhorn_knopp(ref["teacher_masked_logits"], ref["teacher_temp"], 3, n_samples=int(masks.sum()))
    assert_close(probs, ref["teacher_probs_sinkhorn"])
    loss = ibot_masked_cross_entropy(ref["student_masked_logits"], ref["teacher_probs_sinkhorn"], masks,
                                     ref["student_temp"])
    assert_close(loss, ref["loss"])


def test_koleo_from_lightly_matches_dinov3(reference):
    assert_close(koleo_loss(reference["koleo"]["features"]), reference["koleo"]["loss"])


def test_gram_loss_matches_dinov3_in_both_negative_handling_variants(reference):
    ref = reference["gram"]
    student, teacher = ref["student_patch_features"], ref["gram_teacher_patch_features"]
    assert_close(GramLoss("both")(student, teacher), ref["loss"])
    assert_close(GramLoss("teacher")(student, teacher), ref["loss_keep_negatives"])
    # DINOv3's stage configs keep all similarities: a third, larger value (negatives now count)
    assert GramLoss("none")(student, teacher) > ref["loss_keep_negatives"]
    assert GramLoss("none")(teacher, teacher) == 0


def official_gram_loss_keep_negatives(student, teacher) -> float:
    """DINOv3 ``GramLoss(remove_neg=False, remove_only_teacher_neg=False)`` with ``img_level=True`` (loss/gram_loss.py,
    the variant every stage config sets), written out in float64 NumPy: per image, cosine Gram matrices of the
    L2-normalised patch features, then the mean squared difference over all images and entries."""
    s = student.double().numpy()
    t = teacher.double().numpy()
    s = s / np.maximum(np.linalg.norm(s, axis=-1, keepdims=True), 1e-12)  # F.normalize(dim=-1), eps 1e-12
    t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    student_sim = np.einsum("bnd,bmd->bnm", s, s)
    teacher_sim = np.einsum("bnd,bmd->bnm", t, t)
    return float(np.mean((student_sim - teacher_sim) ** 2))  # nn.MSELoss(): mean over B x N x N


def test_gram_loss_of_the_stage_configs_matches_dinov3s_formula(reference):
    variants = {load_config(n).gram.remove_negatives for n in available_configs() if load_config(n).gram.enabled}
    assert variants == {"none"}  # the variant below is the only one a shipped stage uses
    ref = reference["gram"]
    student, teacher = ref["student_patch_features"], ref["gram_teacher_patch_features"]
    expected = official_gram_loss_keep_negatives(student, teacher)
    assert float(GramLoss("none")(student, teacher)) == pytest.approx(expected, rel=RTOL)
    assert expected > float(ref["loss_keep_negatives"])  # negatives now count: more than either clamped variant
    torch.manual_seed(3)  # and on features with a scale and many negative similarities, as real tokens have
    a, b = 5 * torch.randn(3, 20, 16), torch.randn(3, 20, 16) - 0.5
    assert float(GramLoss("none")(a, b)) == pytest.approx(official_gram_loss_keep_negatives(a, b), rel=RTOL)


def test_gram_loss_rejects_mismatched_features():
    with pytest.raises(ValueError, match="tensors of one shape"):
        GramLoss()(torch.zeros(2, 4, 8), torch.zeros(2, 5, 8))


def test_dino_head_exports_dinov3_key_names_and_reads_them_back():
    torch.manual_seed(0)
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, layers=3)
    official = head.official_state_dict()
    assert sorted(official) == ["last_layer.weight", "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight",
                                "mlp.4.bias", "mlp.4.weight"]
    assert official["last_layer.weight"].shape == (32, 8)
    other = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, layers=3)
    other.load_official_state_dict(official)
    x = torch.randn(3, 16)
    torch.testing.assert_close(other(x), head(x))
    assert sorted(DINOHead(16, 32, bottleneck_dim=8, layers=1).official_state_dict()) == [
        "last_layer.weight", "mlp.bias", "mlp.weight"]
