"""Adversarial evaluation: FGSM sweeps and AutoAttack, attacking in [0, 1] pixel space.

Conventions:

* inputs are images in [0, 1] (after timm's resize/crop, before normalisation); the model used for attacks includes
  the mean/std normalisation (``dr.evaluate.loop.NormalizedModel``), so epsilons are in pixel units;
* epsilons are given in 1/255 units (``eps=4`` means 4/255), the L-inf budget;
* FGSM (Goodfellow et al. 2015): ``x_adv = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1)``, one gradient per image
  shared by all epsilons, the model in eval mode; ``eps=0`` is the clean accuracy;
* AutoAttack (Croce & Hein, ICML 2020) in its reference implementation (fra31/auto-attack, packaged on PyPI as
  ``pyautoattack``, the optional ``robust`` extra), ``version='standard'``: APGD-CE (100 iterations, 1 restart),
  APGD-T (targeted DLR, 9 target classes), FAB-T (9 target classes), Square (5000 queries), L-inf, eps 4/255 by
  default. When the package cannot be imported the result says ``unavailable: <reason>``; it is never skipped
  silently;
* evaluation never changes the model: every attack runs inside ``preserved_model_state``, which puts the model in
  eval mode and restores every module's training flag, every buffer (BatchNorm running statistics) and the global
  torch RNG afterwards (AutoAttack reseeds it), warning if an attack had changed any of them.
"""
import contextlib
import logging
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

AUTOATTACK_EPS = 4.0  # in 1/255 units: RobustBench's ImageNet L-inf budget
AUTOATTACK_NORM = 'Linf'
AUTOATTACK_VERSION = 'standard'
AUTOATTACK_PACKAGE = 'pyautoattack'
AUTOATTACK_MIN_CLASSES = 4  # the targeted DLR loss of APGD-T needs the 4 largest logits

HeadFn = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, what: str = 'attack') -> Iterator[nn.Module]:
    """Run a block (an attack) on ``model`` in eval mode and leave the model exactly as it was.

    Saves every module's ``training`` flag, a copy of every buffer (BatchNorm running statistics, counters) and the
    global torch RNG state (CPU and the model's CUDA device); restores all of them afterwards. A block that changed
    a flag or a buffer is reported as a warning naming ``what``, so a misbehaving attack package cannot silently
    alter later numbers.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(name, b, b.detach().clone()) for name, b in model.named_buffers()]
    tensors = [b for _, b, _ in buffers] + list(model.parameters())
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == 'cuda'})
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            yield model
    finally:
        flipped = [m for m, was in modes if m.training != was]
        for m, was in modes:
            m.training = was
        changed = []
        with torch.no_grad():
            for name, b, saved in buffers:
                if not torch.equal(b, saved):
                    changed.append(name)
                    b.copy_(saved)
        if flipped or changed:
            _logger.warning(f'{what} changed the model ({len(flipped)} module mode flag(s), buffers: '
                            f'{", ".join(changed[:5]) or "none"}{" ..." if len(changed) > 5 else ""}); restored')


def fgsm_correct(
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        eps_255: Sequence[float],
        head: Optional[HeadFn] = None,
        autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
) -> torch.Tensor:
    """Top-1 correctness under FGSM at each epsilon.

    Args:
        model: maps [0, 1] images to logits (normalisation inside), in eval mode.
        images: [B, C, H, W] in [0, 1].
        targets: [B] class indices in the head's class space.
        eps_255: epsilons in 1/255 units.
        head: maps model logits to the scored classes (e.g. ImageNet-A's 200 columns); identity by default.
        autocast: factory of the AMP context to run forward passes in.

    Returns:
        bool tensor [B, len(eps_255)].
    """
    head = head or _identity
    autocast = autocast or contextlib.nullcontext
    if any(e < 0 for e in eps_255):
        raise ValueError(f'FGSM epsilons must be >= 0, got {list(eps_255)}')
    out = torch.zeros(images.shape[0], len(eps_255), dtype=torch.bool, device=images.device)
    if images.shape[0] == 0 or not eps_255:
        return out
    x = images.detach().clone().requires_grad_(True)
    with preserved_model_state(model, 'FGSM'):
        with torch.enable_grad():
            with autocast():
                logits = head(model(x))
            loss = F.cross_entropy(logits.float(), targets, reduction='sum')
            grad, = torch.autograd.grad(loss, x)
        sign = grad.sign()
        clean_pred = logits.detach().argmax(dim=1)
        with torch.no_grad():
            for j, eps in enumerate(eps_255):
                if eps == 0:
                    pred = clean_pred
                else:
                    x_adv = (images + (eps / 255.0) * sign).clamp_(0.0, 1.0)
                    with autocast():
                        pred = head(model(x_adv)).argmax(dim=1)
                out[:, j] = pred.eq(targets)
    return out


class HeadModel(nn.Module):
    """``head(model(x))`` as a module in eval mode (AutoAttack needs a module returning the scored logits)."""

    def __init__(self, model: nn.Module, head: Optional[HeadFn] = None):
        super().__init__()
        self.model = model
        self.head = head or _identity
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(x)).float()


def autoattack_status() -> Tuple[bool, str]:
    """Whether AutoAttack can run here: (True, 'pyautoattack <version>') or (False, 'unavailable: <reason>')."""
    try:
        import pyautoattack
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, (f'unavailable: {AUTOATTACK_PACKAGE} cannot be imported ({type(e).__name__}: {e}); install '
                       f'it with pip install "dr[robust]" (or pip install {AUTOATTACK_PACKAGE})')
    version = getattr(pyautoattack, '__version__', '?')
    if not hasattr(pyautoattack, 'AutoAttack'):
        return False, f'unavailable: {AUTOATTACK_PACKAGE} {version} has no AutoAttack'
    return True, f'{AUTOATTACK_PACKAGE} {version}'


def create_autoattack(model: nn.Module, n_classes: int, eps_255: float = AUTOATTACK_EPS, seed: int = 0,
                      head: Optional[HeadFn] = None, device: Optional[torch.device] = None) -> Any:
    """The reference AutoAttack (``version='standard'``, L-inf) around ``head(model(x))``.

    With fewer than 10 classes the targeted attacks use every other class (``n_classes - 1`` targets) instead of 9.

    Raises:
        RuntimeError: ``unavailable: ...`` when the package cannot be used or there are too few classes.
    """
    ok, status = autoattack_status()
    if not ok:
        raise RuntimeError(status)
    if n_classes < AUTOATTACK_MIN_CLASSES:
        raise RuntimeError(f'unavailable: AutoAttack standard needs >= {AUTOATTACK_MIN_CLASSES} classes (targeted '
                           f'DLR loss), this set scores {n_classes}')
    import pyautoattack
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device('cpu'))
    attack = pyautoattack.AutoAttack(HeadModel(model, head), norm=AUTOATTACK_NORM, eps=eps_255 / 255.0,
                                     version=AUTOATTACK_VERSION, seed=seed, device=device)
    targets = min(attack.apgd_targeted.n_target_classes, n_classes - 1)
    attack.apgd_targeted.n_target_classes = targets
    attack.fab.n_target_classes = targets
    return attack


def autoattack_config(attack: Any) -> Dict[str, Any]:
    """What an AutoAttack object will run, read from the object itself (recorded in the results)."""
    return {
        'package': autoattack_status()[1],
        'version': attack.version,
        'norm': attack.norm,
        'eps': attack.epsilon,
        'eps_255': round(attack.epsilon * 255.0, 6),
        'attacks': list(attack.attacks_to_run),
        'apgd_ce': {'n_iter': attack.apgd.n_iter, 'n_restarts': attack.apgd.n_restarts},
        'apgd_t': {'n_iter': attack.apgd_targeted.n_iter, 'n_restarts': attack.apgd_targeted.n_restarts,
                   'n_target_classes': attack.apgd_targeted.n_target_classes},
        'fab_t': {'n_iter': attack.fab.n_iter, 'n_restarts': attack.fab.n_restarts,
                  'n_target_classes': attack.fab.n_target_classes},
        'square': {'n_queries': attack.square.n_queries, 'n_restarts': attack.square.n_restarts},
        'seed': attack.seed,
    }


def describe_autoattack(n_classes: int, eps_255: float = AUTOATTACK_EPS, seed: int = 0) -> Dict[str, Any]:
    """``autoattack_config`` of the attack ``create_autoattack`` would build (raises like it)."""
    return autoattack_config(create_autoattack(nn.Identity(), n_classes, eps_255, seed, device=torch.device('cpu')))


def autoattack_correct(attack: Any, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                       head: Optional[HeadFn] = None) -> torch.Tensor:
    """Top-1 correctness [B] (bool) of ``head(model(.))`` on AutoAttack's adversarial images.

    The adversarial images are checked to lie within the L-inf budget and in [0, 1] before they are scored.
    """
    head = head or _identity
    if images.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=images.device)
    x = images.detach().float().contiguous()  # FAB reshapes gradients with .view(): a contiguous NCHW batch
    with preserved_model_state(model, 'AutoAttack'):
        adv, _ = attack.run_standard_evaluation(x, targets, batch_size=x.shape[0])
    _check_budget(adv, x, attack.epsilon)
    with torch.no_grad():
        return head(model(adv)).argmax(dim=1).eq(targets)


def _check_budget(adv: torch.Tensor, x: torch.Tensor, eps: float, tol: float = 1e-5) -> None:
    delta = float((adv - x).abs().amax()) if adv.numel() else 0.0
    if delta > eps + tol or float(adv.amin()) < -tol or float(adv.amax()) > 1.0 + tol:
        raise RuntimeError(f'AutoAttack returned images outside the L-inf budget {eps:.6f} or [0, 1] '
                           f'(max |delta| {delta:.6f})')
