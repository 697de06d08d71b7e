"""The paper's system on tiny configurations: critic, worst-case MI, training + checkpoints, estimation, heads."""
from __future__ import annotations

import math

import pytest
import torch

import rmi_fast as rf
from rmi_fast.robust.critics import Critic, CriticConfig, critic_config_for
from rmi_fast.robust.downstream import (EvalAttack, HeadConfig, attack_suite, evaluate_classifier, load_classifier,
                                        save_classifier, train_head)
from rmi_fast.robust.estimation import (EstimationConfig, MIEstimate, adversarial_accuracy_bound, estimate_mi,
                                        evaluate_mi, fit_critic)
from rmi_fast.robust.models import Encoder, EncoderConfig, make_head
from rmi_fast.robust.training import EncoderTrainConfig, load_encoder, train_encoder
from rmi_fast.robust.worst_case import AttackConfig, MIConfig, mi_estimate, worst_case_batch

ENC = EncoderConfig(in_channels=1, image_size=8, conv_channels=(4, 8), hidden=16, dim=8)
CRIT = CriticConfig(in_channels=1, image_size=8, rep_dim=8, conv_channels=(4,), width=16)
ATTACK = AttackConfig(eps=0.1, alpha=0.025, steps=3)


@pytest.fixture(autouse=True)
def _one_thread(torch_threads):
    """Tiny models: intra-op threads only add synchronisation (and stall on a busy machine)."""
    torch_threads(1)


def _images(n=24, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _models(seed=0):
    torch.manual_seed(seed)
    return Encoder(ENC), Critic(CRIT)


def _config(mode="worst-case", **kw):
    return EncoderTrainConfig(**{"mode": mode, "encoder": ENC, "critic": CRIT, "attack": ATTACK, "epochs": 2,
                                 "batch_size": 8, "lr": 1e-3, **kw})


def test_critic_shapes_and_broadcast_through_mi_bound():
    enc, critic = _models()
    x = _images(6)
    z = enc(x)
    assert z.shape == (6, 8)
    local, rep = critic.local(x), critic.represent(z)
    assert local.shape == (CRIT.locations, 6, 16) and CRIT.locations == 16
    assert rep.shape == (6, 16)
    for bound in ("dv", "jsd", "infonce"):
        value = critic(x, z, bound=bound)
        expected = rf.mi_bound(rep, local, bound, scale=CRIT.score_scale)  # rep (B, E) broadcast over G groups
        torch.testing.assert_close(value, expected)
        assert critic(x, z, bound=bound, reduction="none").shape == (CRIT.locations, 6)
    zero = critic(x, z, bound="dv", diagonal="zero")
    torch.testing.assert_close(zero, rf.mi_bound(rep, local, "dv", scale=CRIT.score_scale, diagonal="zero"))
    with pytest.raises(ValueError, match="bound"):
        critic(x, z, bound="nope")


def test_critic_shares_no_parameters_with_encoder():
    enc, critic = _models()
    assert not {id(p) for p in enc.parameters()} & {id(p) for p in critic.parameters()}


@pytest.mark.parametrize("through", [False, True])
def test_worst_case_lowers_mi_and_stays_feasible(through):
    enc, critic = _models()
    x = _images(8)
    attack = AttackConfig(eps=0.1, alpha=0.05, steps=5, through_input_branch=through)
    mi = MIConfig()
    enc.train()
    x_adv = worst_case_batch(enc, critic, x, attack, mi)
    assert enc.training  # restored after the attack
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean, worst = mi_estimate(enc, critic, x, mi), mi_estimate(enc, critic, x_adv, mi)
    assert worst <= clean + 1e-6
    assert worst < clean  # the attack does find a lower MI
    assert all(p.grad is None for p in [*enc.parameters(), *critic.parameters()])


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        _config(mode="other")
    with pytest.raises(ValueError, match="eps"):
        AttackConfig(eps=-1, alpha=0.1, steps=1)
    with pytest.raises(ValueError, match="bound"):
        MIConfig(bound="nwj2")
    with pytest.raises(ValueError, match="head"):
        make_head("cnn")
    with pytest.raises(ValueError, match="images"):
        train_encoder(_config(), torch.rand(4, 3, 8, 8))


@pytest.mark.parametrize("mode", ["infomax", "worst-case"])
def test_training_raises_the_bound(mode):
    images = _images(32)
    config = _config(mode, epochs=12, batch_size=16, lr=3e-3)
    run = train_encoder(config, images)
    assert run.finished and run.step == 24 and len(run.history) == 24
    first, last = sum(run.history[:4]) / 4, sum(run.history[-4:]) / 4
    assert last > first


def test_checkpoint_weights_only_and_resume_matches_uninterrupted(tmp_path):
    images = _images(32)
    config = _config(epochs=3, batch_size=8)  # 4 steps per epoch, 12 in all
    full = train_encoder(config, images)
    ckpt = tmp_path / "enc.pt"
    part = train_encoder(config, images, checkpoint=ckpt, checkpoint_every=1, stop_after=5)
    assert not part.finished and part.step == 5
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert payload["step"] == 5 and payload["config"]["mode"] == "worst-case"
    assert EncoderTrainConfig.from_dict(payload["config"]) == config
    resumed = train_encoder(config, images, checkpoint=ckpt)
    assert resumed.finished and resumed.step == 12
    for a, b in zip([*full.encoder.parameters(), *full.critic.parameters()],
                    [*resumed.encoder.parameters(), *resumed.critic.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert resumed.history == pytest.approx(full.history, rel=1e-5)
    encoder, loaded_config = load_encoder(ckpt)
    assert loaded_config == config
    torch.testing.assert_close(encoder(images), full.encoder(images).detach())
    with pytest.raises(ValueError, match="different config"):
        train_encoder(_config(epochs=4, batch_size=8), images, checkpoint=ckpt)


def test_estimation_rv_and_theorem_bound():
    enc, _ = _models()
    config = EstimationConfig(critic=CRIT, attack=ATTACK, epochs=2, batch_size=8)
    est = estimate_mi(enc, _images(16), _images(16, seed=1), config)
    assert isinstance(est, MIEstimate)
    assert est.rv == pytest.approx(est.mi_natural - est.mi_worst)
    assert est.to_dict()["rv"] == est.rv
    assert adversarial_accuracy_bound(1.0, 10) == pytest.approx((1.0 + math.log(2)) / math.log(10))
    assert adversarial_accuracy_bound(0.0, 2) == pytest.approx(1.0)
    # MI is never negative: a negative estimate's bound is MI 0's, not a lower one that a sound model could break
    assert adversarial_accuracy_bound(-5.0, 10) == adversarial_accuracy_bound(0.0, 10) == pytest.approx(
        math.log(2) / math.log(10))
    with pytest.raises(ValueError):
        adversarial_accuracy_bound(1.0, 1)


@pytest.mark.parametrize("head,training", [("linear", "standard"), ("mlp", "robust")])
def test_heads_train_and_evaluate(head, training, tmp_path):
    enc, _ = _models()
    images, labels = _images(40), torch.arange(40) % 4
    config = HeadConfig(head=head, training=training, attack=EvalAttack("pgd", "pgd", 0.1, 2, 0.05), epochs=2,
                        batch_size=8)
    model = train_head(enc, images, labels, config, num_classes=4)
    attacks = attack_suite(0.1, 0.05, 2)
    metrics = evaluate_classifier(model, images, labels, attacks, batch_size=16)
    assert set(metrics["attacks"]) == {a.name for a in attacks}
    assert 0 <= metrics["worst"] <= min(metrics["attacks"].values()) <= 1
    assert isinstance(metrics["masking_warnings"], list)
    save_classifier(tmp_path / "clf.pt", model, config, dataset="digits", num_classes=4)
    loaded, meta = load_classifier(tmp_path / "clf.pt")
    assert meta["head_config"] == config
    torch.testing.assert_close(loaded(images), model(images))
    with pytest.raises(ValueError, match="attack"):
        HeadConfig(training="robust")


# ----------------------------------------------------------------------------------------------------- bad inputs

def _nan_image():
    x = _images(16)
    x[3, 0, 2, 2] = math.nan
    return x


_EST = EstimationConfig(critic=CRIT, attack=ATTACK, epochs=1, batch_size=8)
_HEAD = HeadConfig(head="linear", epochs=1, batch_size=8)


@pytest.mark.parametrize("call, error, words", [
    # configs: a wrong type is a TypeError, a value out of range a ValueError, each naming the field
    (lambda: CriticConfig(conv_channels=()), ValueError, "CriticConfig.conv_channels must hold at least one"),
    (lambda: CriticConfig(conv_channels=(0,)), ValueError, "CriticConfig.conv_channels[0] must be an integer >= 1"),
    (lambda: CriticConfig(conv_channels=(2.7,)), TypeError, "CriticConfig.conv_channels[0] must be an integer"),
    (lambda: CriticConfig(in_channels=True), TypeError, "CriticConfig.in_channels must be an integer"),
    (lambda: CriticConfig(scale="x"), TypeError, "CriticConfig.scale must be a real number"),
    (lambda: EncoderConfig(conv_channels="64"), TypeError, "EncoderConfig.conv_channels must be a sequence"),
    (lambda: EncoderConfig(image_size=4, conv_channels=(4, 4, 4)), ValueError, "leave nothing of a 4×4 image"),
    (lambda: AttackConfig(eps="0.1", alpha=0.1, steps=1), TypeError, "eps must be a real number"),
    (lambda: AttackConfig(eps=math.inf, alpha=0.1, steps=1), ValueError, "eps must be a non-negative finite"),
    (lambda: AttackConfig(eps=0.1, alpha=0.1, steps=True), TypeError, "steps must be an integer"),
    (lambda: AttackConfig(eps=0.1, alpha=0.1, steps=1, random_start="no"), TypeError, "random_start must be True"),
    (lambda: MIConfig(backend="xyz"), ValueError, "backend must be 'auto' or one of"),
    (lambda: _config(lr=math.inf), ValueError, "lr must be a positive finite number"),
    (lambda: _config(lr="1e-3"), TypeError, "lr must be a real number"),
    (lambda: _config(seed="a"), TypeError, "seed must be an integer"),
    (lambda: _config(seed=2**64), ValueError, "seed must be below 2**63"),
    (lambda: HeadConfig(hidden=-1), ValueError, "hidden must be an integer >= 1"),
    (lambda: EvalAttack("pgd", "pgd", -0.1, 2, 0.05), ValueError, "eps must be a non-negative finite"),
    (lambda: EvalAttack("apgd", "apgd", 0.1, -1), ValueError, "steps must be an integer >= 0"),
    (lambda: attack_suite(0.1, 0.05, 0), ValueError, "steps must be an integer >= 1"),
    (lambda: adversarial_accuracy_bound("0.5", 10), TypeError, "mi_worst must be a real number"),
    # sub-configs of their own class (a checkpoint of any other could not be read back), width 0 is not "default"
    (lambda: _config(attack=None), TypeError, "attack must be AttackConfig, got NoneType"),
    (lambda: _config(mi="dv"), TypeError, "mi must be MIConfig, got str"),
    (lambda: _config(encoder=ENC.to_dict()), TypeError, "encoder must be EncoderConfig, got dict"),
    (lambda: EstimationConfig(critic=CRIT, attack=None), TypeError, "attack must be AttackConfig"),
    (lambda: HeadConfig(training="robust", attack=ATTACK), TypeError, "attack must be EvalAttack or None"),
    (lambda: critic_config_for(1, 8, 8, width=0), ValueError, "CriticConfig.width must be an integer >= 1"),
    (lambda: make_head("mlp", 8, 10, -1), ValueError, "hidden must be an integer >= 1"),
    (lambda: make_head("linear", 8, 1), ValueError, "num_classes must be an integer >= 2"),
    (lambda: EvalAttack("", "pgd", 0.1, 2, 0.05), ValueError, "attack name must be a non-empty string"),
    # flags are True or False: a truthy "no" must not mean True
    (lambda: train_encoder(_config(), _images(16), resume="no"), TypeError, "resume must be True or False"),
    (lambda: train_encoder(_config(), _images(16), distributed="no"), TypeError, "distributed must be True or False"),
    (lambda: train_encoder(_config(), _images(16), checkpoint_every="5"), TypeError,
     "checkpoint_every must be an integer"),
    (lambda: train_encoder(_config(), _images(16), stop_after=-3), ValueError, "stop_after must be an integer >= 0"),
    (lambda: evaluate_mi(_models()[0], Critic(CRIT), _images(16), _EST, worst_case="no"), TypeError,
     "worst_case must be True or False"),
    (lambda: fit_critic(_models()[0], _images(16), _EST, worst_case=1), TypeError, "worst_case must be True or False"),
    (lambda: Critic(CRIT)(_images(4), torch.rand(4, 8), detach_local="no"), TypeError,
     "detach_local must be True or False"),
    # the critic's representation width against the encoder's, before any fit
    (lambda: estimate_mi(_models()[0], _images(16), _images(16), EstimationConfig(
        critic=CriticConfig(in_channels=1, image_size=8, rep_dim=9, conv_channels=(4,), width=16), attack=ATTACK)),
     ValueError, "config.critic.rep_dim (9) must equal the encoder's representation size (8)"),
    (lambda: Critic(CRIT)(_images(1), torch.rand(1, 8)), ValueError, "x: the bound needs at least 2 images"),
    # images: the model's shape, float32, values in [0, 1], enough of them; checked before any work
    (lambda: train_encoder(_config(), _images(16).double()), TypeError, "images must be float32"),
    (lambda: train_encoder(_config(mode="infomax"), _nan_image()), ValueError,
     "images must lie in [0, 1] (and hold no NaN)"),
    (lambda: train_encoder(_config(), _images(16) * 2), ValueError, "they span [0"),
    (lambda: train_encoder(_config(), _images(1)), ValueError, "need at least 2 images"),
    (lambda: estimate_mi(_models()[0], _images(16), torch.rand(16, 1, 16, 16), _EST), ValueError,
     "eval_images must be a (B, 1, 8, 8) batch of images, got (16, 1, 16, 16)"),
    (lambda: train_head(_models()[0], _images(0), torch.zeros(0, dtype=torch.long), _HEAD, num_classes=4), ValueError,
     "need at least 1 images"),
    # labels: integer class indices, one per image, in range
    (lambda: train_head(_models()[0], _images(8), torch.zeros(8), _HEAD, num_classes=4), TypeError,
     "labels must be an integer tensor"),
    (lambda: train_head(_models()[0], _images(8), torch.arange(8), _HEAD, num_classes=4), ValueError,
     "labels must lie in [0, 4); they span [0, 7]"),
    (lambda: train_head(_models()[0], _images(8), torch.zeros(7, dtype=torch.long), _HEAD, num_classes=4),
     ValueError, "labels must have shape (8,)"),
    (lambda: train_head(_models()[0], _images(8), torch.zeros(8, dtype=torch.long), _HEAD, num_classes=1),
     ValueError, "num_classes must be an integer >= 2"),
    (lambda: evaluate_classifier(_classifier(4), _images(8), torch.arange(8), []), ValueError,
     "labels must lie in [0, 4): the model has 4 outputs"),
    # attacks: results are keyed by name, the clean accuracy's is "natural"
    (lambda: evaluate_classifier(_classifier(4), _images(8), torch.arange(8) % 4, attack_suite(0.1, 0.05, 1) * 2),
     ValueError, "attacks[3]: the name 'pgd' is taken by an earlier one"),
    (lambda: evaluate_classifier(_classifier(4), _images(8), torch.arange(8) % 4,
                                 [EvalAttack("Natural", "pgd", 0.1, 1, 0.05)]),
     ValueError, "attacks[0]: the name 'Natural' is the clean accuracy's"),
    (lambda: evaluate_classifier(_classifier(4), _images(8), torch.arange(8) % 4, "pgd"), TypeError,
     "attacks must be a list of EvalAttack"),
    (lambda: evaluate_classifier(_classifier(4), _images(8), torch.arange(8) % 4, [], seed=1.5), TypeError,
     "seed must be an integer"),
    # modules: an input of another shape than the config's
    (lambda: Critic(CRIT)(torch.rand(4, 1, 16, 16), torch.rand(4, 8)), ValueError, "x must be a (B, 1, 8, 8) batch"),
    (lambda: Critic(CRIT)(_images(4), torch.rand(4, 9)), ValueError, "z must be (4, 8)"),
    (lambda: Encoder(ENC)(torch.rand(4, 3, 8, 8)), ValueError, "x must be a (B, 1, 8, 8) batch of images"),
])
def test_bad_inputs_are_named(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value), str(info.value)


def _classifier(classes):
    from rmi_fast.robust.models import Classifier

    return Classifier(Encoder(ENC), make_head("linear", ENC.dim, classes))


def test_malformed_checkpoints_name_the_file(tmp_path):
    """A resumable checkpoint whose entries disagree, or that lacks one, is refused with its path; one from a run
    over other images, as many or not, is not resumed (its steps would stand for other samples and epochs)."""
    images = _images(32)
    config = _config(epochs=2, batch_size=8)  # 8 steps
    ckpt = tmp_path / "enc.pt"
    train_encoder(config, images, checkpoint=ckpt, checkpoint_every=1, stop_after=3)
    good = torch.load(ckpt, weights_only=True)

    def edited(**changes):
        path = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}.pt"
        payload = {k: v for k, v in {**good, **changes}.items() if v is not None}
        torch.save(payload, path)
        return path

    cases = [
        (edited(data=None), "holds no digest of the images it was trained on"),
        (edited(step=10**6), "step 1000000 of 8 with a history of shape (3,): they must agree"),
        (edited(step=-5), "step -5 of 8"),
        (edited(history="abc"), "with a history of shape ()"),
        (edited(encoder=None), "malformed 'rmi_fast.robust.encoder' checkpoint (KeyError: 'encoder')"),
        (edited(attack_rng=torch.zeros(3, dtype=torch.uint8)), "malformed 'rmi_fast.robust.encoder' checkpoint"),
        (edited(config={**good["config"], "extra": 1}), "(TypeError:"),
        (edited(config="a string"), "malformed"),
    ]
    for path, words in cases:
        with pytest.raises(ValueError) as info:
            train_encoder(config, images, checkpoint=path)
        assert str(path) in str(info.value) and words in str(info.value), str(info.value)
    for other in (images[:16], 1 - images, images[torch.arange(32).roll(1)]):
        with pytest.raises(ValueError, match=r"holds a run over other images \(32x1x8x8 blake2b:\w{32}\) than these"):
            train_encoder(config, other, checkpoint=ckpt)
    train_encoder(config, images.clone(), checkpoint=ckpt, stop_after=4)  # the same values: resumed
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    with pytest.raises(ValueError, match="malformed 'rmi_fast.robust.encoder' checkpoint"):
        load_encoder(edited(encoder={"features.0.weight": torch.zeros(1)}))
    model = _classifier(4)
    save_classifier(tmp_path / "clf.pt", model, _HEAD, dataset="digits", num_classes=4)
    payload = torch.load(tmp_path / "clf.pt", weights_only=True)
    del payload["head"]
    torch.save(payload, tmp_path / "clf-nohead.pt")
    with pytest.raises(ValueError, match=r"clf-nohead.pt is a malformed 'rmi_fast.robust.classifier' checkpoint"):
        load_classifier(tmp_path / "clf-nohead.pt")


def test_attack_objective_ranks_every_misclassified_point_first():
    """Over random logits: the objective of any misclassified point exceeds that of any correctly classified one
    (however high its CE), and its gradient is the cross-entropy's."""
    from rmi_fast.robust.downstream import attack_objective

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4000, 5, generator=g) * torch.rand(4000, 1, generator=g) * 6).requires_grad_()
    y = torch.randint(0, 5, (4000,), generator=g)
    value = attack_objective(logits, y)
    missed = logits.argmax(1) != y
    assert 0 < missed.sum() < 4000
    assert value[missed].min() > value[~missed].max()
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert (ce[~missed].max() > ce[missed].min())  # plain CE would rank some misclassified points below correct ones
    grad, = torch.autograd.grad(value.sum(), logits)
    torch.testing.assert_close(grad, torch.autograd.grad(ce.sum(), logits)[0])


def test_estimation_gives_the_encoder_back_as_it_was():
    """Estimating MI mid-training must not freeze the encoder: its train mode and parameter flags come back."""
    enc, _ = _models()
    enc.train()
    enc.mlp[-1].bias.requires_grad_(False)  # a parameter the caller froze stays frozen
    estimate_mi(enc, _images(16), _images(16, seed=1), _EST)
    assert enc.training and all(m.training for m in enc.modules())
    assert [p.requires_grad for p in enc.parameters()] == [p is not enc.mlp[-1].bias for p in enc.parameters()]
