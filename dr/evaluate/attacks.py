"""Adversarial evaluation: FGSM sweeps and AutoAttack, attacking in [0, 1] pixel space.

Conventions:

* inputs are images in [0, 1] (after timm's resize/crop, before normalisation); the model used for attacks includes
  the mean/std normalisation (``dr.evaluate.loop.NormalizedModel``), so epsilons are in pixel units;
* epsilons are given in 1/255 units (``eps=4`` means 4/255), the L-inf budget;
* FGSM (Goodfellow et al. 2015): ``x_adv = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1)``, one gradient per image
  shared by all epsilons, the model in eval mode; ``eps=0`` is the clean accuracy;
* AutoAttack (Croce & Hein 2020), standard version (APGD-CE, APGD-T, FAB-T, Square), L-inf, eps 4/255, through the
  ``torchattacks`` package. When it cannot be imported the result says ``unavailable: <reason>``; it is never
  skipped silently.
"""
import contextlib
import logging
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

AUTOATTACK_EPS = 4.0  # in 1/255 units
AUTOATTACK_NORM = 'Linf'
AUTOATTACK_VERSION = 'standard'

HeadFn = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


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
    """``head(model(x))`` as a module (torchattacks needs a module returning the scored logits)."""

    def __init__(self, model: nn.Module, head: Optional[HeadFn] = None):
        super().__init__()
        self.model = model
        self.head = head or _identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(x)).float()


def autoattack_status() -> Tuple[bool, str]:
    """Whether AutoAttack can run here: (True, 'torchattacks <version>') or (False, 'unavailable: <reason>')."""
    try:
        import torchattacks
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, f'unavailable: torchattacks cannot be imported ({type(e).__name__}: {e})'
    if not hasattr(torchattacks, 'AutoAttack'):
        return False, f'unavailable: torchattacks {getattr(torchattacks, "__version__", "?")} has no AutoAttack'
    return True, f'torchattacks {getattr(torchattacks, "__version__", "?")}'


def create_autoattack(model: nn.Module, n_classes: int, eps_255: float = AUTOATTACK_EPS, seed: int = 0,
                      head: Optional[HeadFn] = None):
    """torchattacks' AutoAttack (standard, L-inf) around ``head(model(x))``.

    Raises:
        RuntimeError: ``unavailable: ...`` when torchattacks cannot be used.
    """
    ok, status = autoattack_status()
    if not ok:
        raise RuntimeError(status)
    import torchattacks
    return torchattacks.AutoAttack(HeadModel(model, head), norm=AUTOATTACK_NORM, eps=eps_255 / 255.0,
                                   version=AUTOATTACK_VERSION, n_classes=n_classes, seed=seed)


def autoattack_correct(attack, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                       head: Optional[HeadFn] = None) -> torch.Tensor:
    """Top-1 correctness [B] (bool) of ``head(model(.))`` on AutoAttack's adversarial images."""
    head = head or _identity
    if images.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=images.device)
    # torchattacks' FAB reshapes gradients with .view(): give it a contiguous NCHW batch
    adv = attack(images.contiguous(), targets)
    with torch.no_grad():
        return head(model(adv)).argmax(dim=1).eq(targets)
