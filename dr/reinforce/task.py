"""Training task for reinforced data: KL(teacher || student) on the stored teacher distributions."""
import logging
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import TrainingTask
from torch.nn.parallel import DistributedDataParallel as DDP

_logger = logging.getLogger(__name__)

RD_LOSSES = ('kl',)


def kl_teacher_student(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || softmax(logits)), summed over classes and averaged over the batch (no temperature).

    Computed in float32 whatever the autocast dtype. Zero teacher probabilities contribute nothing (0 log 0 = 0).
    """
    log_q = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(log_q, target_probs.float(), reduction='batchmean')


class ReinforcedTask(TrainingTask):
    """Student training on reinforced data (Faghri et al., "Reinforce Data, Multiply Impact", ICCV 2023).

    ``loss = KL(teacher || student) + gt_weight * CE(logits, labels)``. The teacher distribution is the dense target
    built by the reinforced loader from the stored top-k (``dr.reinforce.format.densify``); samples that did not use a
    stored reinforcement (``--rd-p`` < 1) carry their one-hot label there, for which the KL term equals the CE.

    Args:
        model: The student.
        loss: Distillation loss; only ``kl`` (the paper's choice) is implemented.
        gt_weight: Weight of the added cross-entropy on the ground-truth labels (``--rd-gt-weight``).
        device: Device for task tensors/buffers.
        dtype: Dtype for task tensors/buffers.
        verbose: Log the configuration.
    """

    def __init__(
            self,
            model: nn.Module,
            loss: str = 'kl',
            gt_weight: float = 0.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if loss not in RD_LOSSES:
            raise ValueError(f'--rd-loss {loss!r} is not supported; choose one of: {", ".join(RD_LOSSES)}')
        if gt_weight < 0:
            raise ValueError(f'--rd-gt-weight must be >= 0, got {gt_weight}')
        self.trainable_module = model
        self.loss = loss
        self.gt_weight = float(gt_weight)
        if self.verbose:
            _logger.info(f'ReinforcedTask: loss={loss} (KL(teacher || student), T=1), gt_weight={self.gt_weight}')

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'ReinforcedTask':
        """Wrap the student in DistributedDataParallel."""
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the student (before DDP wrapping); training and eval share the forward."""
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = self.trainable_module
        return self.trainable_module

    def forward(
            self,
            input: torch.Tensor,
            target: Union[Tuple[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]],
    ) -> Dict[str, torch.Tensor]:
        """Student forward and loss.

        Args:
            input: Input batch [B, C, H, W].
            target: ``(probs [B, K] float, labels [B] int64)`` as yielded by the reinforced loader.

        Returns:
            ``loss`` (for backward), ``output`` (logits), ``loss_rd`` (the KL term) and ``loss_ce`` (the unweighted
            cross-entropy on the labels; it enters ``loss`` multiplied by ``gt_weight``).
        """
        if not isinstance(target, (tuple, list)) or len(target) != 2:
            raise TypeError('ReinforcedTask expects target = (probs [B, K], labels [B]) from the reinforced loader')
        probs, labels = target
        output = self.trainable_module(input)
        if probs.shape != output.shape:
            raise ValueError(
                f'Reinforced targets have shape {tuple(probs.shape)} but the model outputs {tuple(output.shape)} '
                f'(--num-classes must equal the shards\' num_classes)')
        loss_rd = kl_teacher_student(output, probs)
        loss_ce = F.cross_entropy(output.float(), labels)
        loss = loss_rd + self.gt_weight * loss_ce if self.gt_weight > 0 else loss_rd
        return {
            'loss': loss,
            'output': output,
            'loss_rd': loss_rd,
            'loss_ce': loss_ce,
        }
