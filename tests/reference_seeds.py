"""Reference implementations copied from the source write-ups in ``/work/shared/seeds``.

They are kept as close to the printed code as possible, so that the tests compare
``segfocal.losses`` with the code the project grew from, not with a re-derivation of our own.
Every change from the printed code is listed in the docstring of the function it affects.

* Seed 003 (dense focal loss for segmentation, ``[B, C, H, W]`` logits, gamma = 2):
  :func:`compute_class_weights`, :func:`focal_loss_my`, :func:`focal_loss_zhihu`.
* Seed 001 (PolyLoss, classification logits ``[N, C]``): :func:`cross_entropy_tf`,
  :func:`cross_entropy_torch`, :func:`poly1_cross_entropy_tf`, :func:`poly1_cross_entropy_torch`,
  :class:`FocalLoss`, :func:`poly1_focal_loss_torch`.

Not a test module (no ``test_`` prefix); the test modules import it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Seed 003: two dense focal losses with on-the-fly (ENet-style) class weights
# --------------------------------------------------------------------------------------------


def compute_class_weights(histogram, C=6, dtype=np.float64):
    """Seed 003 ``compute_class_weights``: ``w_c = 1 / ln(1.10 + f_c)``, ``f_c = count_c / total``.

    Changes from the printed code: the number of classes ``C`` is a parameter (printed: 6), and the
    weights are held in ``dtype`` (printed: ``np.float32``; float64 by default here so that the
    float64 equivalence tests are not limited by float32 rounding of the weights).
    """
    classWeights = np.ones(C, dtype=dtype)
    normHist = histogram / np.sum(histogram)
    for i in range(C):
        classWeights[i] = 1 / (np.log(1.10 + normHist[i]))
    return classWeights


def _histogram(target, C):
    """Per-class pixel counts of the flattened target, by a loop over ``range(C)``.

    Replaces the printed ``number_0 = torch.sum(target == 0).item()`` ... ``number_5`` lines.
    Labels outside ``[0, C)`` (e.g. an ignore label) are not counted, as in the printed code.
    """
    return np.array([torch.sum(target == k).item() for k in range(C)], dtype=np.float64)


def focal_loss_my(input, target, apply_weights=False, ignore_index=-100):
    """Seed 003 ``focal_loss_my``: the ``nll_loss`` trick (``nll_loss(softmax)`` gives ``-p_t``).

    ``mean_w(-(1 - p_t)^2 * log p_t)`` over the pixels, gamma fixed at 2 as printed.

    Changes from the printed code:

    * any number of classes ``C`` (histogram by a loop over ``range(C)``, not 6 hard-coded counts);
    * ``reduction='elementwise_mean'`` (removed from PyTorch) is ``'mean'``;
    * the weights are cast to the input's dtype (printed: ``.float()``);
    * ``apply_weights=True`` passes ``weight=weights`` to the final ``F.nll_loss`` (printed:
      ``weight=None``, the weights are computed and never used). ``nll_loss`` then divides by the
      sum of the pixels' weights (segfocal's ``normalize="weights"``);
    * ``ignore_index`` is passed to both ``nll_loss`` calls (printed: their default, -100).
    """
    n, c, h, w = input.size()

    target = target.long()
    input = input.transpose(1, 2).transpose(2, 3).contiguous().view(-1, c)
    target = target.contiguous().view(-1)

    frequency = _histogram(target, c)
    classWeights = compute_class_weights(frequency, c)
    # 根据当前给出的ground truth label计算出每个类别所占据的权重

    weights = torch.from_numpy(classWeights).to(input.dtype)
    focal_frequency = F.nll_loss(F.softmax(input, dim=1), target, reduction='none', ignore_index=ignore_index)
    # -p_t per pixel

    focal_frequency += 1.0  # shape [num_samples] 1-P（gt_classes）

    focal_frequency = torch.pow(focal_frequency, 2)
    focal_frequency = focal_frequency.repeat(c, 1)
    # after repeat: [num_classes, num_samples]
    focal_frequency = focal_frequency.transpose(1, 0)
    loss = F.nll_loss(focal_frequency * (torch.log(F.softmax(input, dim=1))), target,
                      weight=weights if apply_weights else None,
                      reduction='mean', ignore_index=ignore_index)
    return loss


def focal_loss_zhihu(input, target, apply_weights=False):
    """Seed 003 ``focal_loss_zhihu``: softmax, one-hot mask by ``scatter_``, ``p_t``, mean.

    ``mean(-(1 - p_t)^2 * log p_t)`` over all pixels (no ignore label: ``scatter_`` needs every
    label in ``[0, C)``), gamma fixed at 2 as printed.

    Changes from the printed code:

    * ``class_mask = inputs.new_zeros(N, C)`` added (printed: never created, a ``NameError``);
    * any number of classes ``C`` (histogram by a loop over ``range(C)``);
    * the debug ``print`` calls are dropped; the weights are cast to the input's dtype;
    * ``apply_weights=True`` uses the commented-out line
      ``batch_loss = -weights * (torch.pow((1 - probs), gamma)) * log_p``, then ``.mean()``
      (divides by the pixel count: segfocal's ``normalize="pixels"``). As printed, ``weights``
      has shape ``[N]`` and ``probs`` ``[N, 1]``, so that line would broadcast to ``[N, N]`` and
      its mean would be ``mean(w) * mean(focal)``; ``weights`` is reshaped to ``[N, 1]`` here so
      that each pixel gets its own class's weight, which is what the line means.
    """
    n, c, h, w = input.size()

    target = target.long()
    inputs = input.transpose(1, 2).transpose(2, 3).contiguous().view(-1, c)
    target = target.contiguous().view(-1)

    N = inputs.size(0)
    C = inputs.size(1)

    frequency = _histogram(target, C)
    classWeights = compute_class_weights(frequency, C)

    weights = torch.from_numpy(classWeights).to(inputs.dtype)
    weights = weights[target.view(-1)]  # 这行代码非常重要

    gamma = 2

    P = F.softmax(inputs, dim=1)  # shape [num_samples,num_classes]

    class_mask = inputs.new_zeros(N, C)
    ids = target.view(-1, 1)
    class_mask.scatter_(1, ids.data, 1.)  # shape [num_samples,num_classes] one-hot encoding

    probs = (P * class_mask).sum(1).view(-1, 1)  # shape [num_samples,]
    log_p = probs.log()

    if apply_weights:
        batch_loss = -weights.view(-1, 1) * (torch.pow((1 - probs), gamma)) * log_p
    else:
        batch_loss = -(torch.pow((1 - probs), gamma)) * log_p

    loss = batch_loss.mean()
    return loss


# --------------------------------------------------------------------------------------------
# Seed 001: PolyLoss (Poly-1) for cross-entropy and focal loss, classification logits [N, C]
# --------------------------------------------------------------------------------------------


def cross_entropy_tf(logits, labels, class_number):
    """Seed 001 ``cross_entropy_tf`` in PyTorch: ``softmax_cross_entropy_with_logits(one_hot(labels))``.

    Changes: ``tf.one_hot`` -> ``F.one_hot``, ``tf.nn.softmax_cross_entropy_with_logits`` written
    out as ``-sum(labels * log_softmax(logits))`` over the last axis (its definition).
    """
    labels = F.one_hot(labels, class_number).to(logits.dtype)
    ce_loss = -(labels * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return ce_loss


def cross_entropy_torch(logits, labels):
    """Seed 001 PyTorch cross-entropy: ``F.cross_entropy(logits, labels, reduction='none')``.

    Change: ``torch.tensor(logits)`` on tensors dropped (it only copies, with a warning).
    """
    return F.cross_entropy(logits, labels, reduction='none')


def poly1_cross_entropy_tf(logits, labels, class_number, epsilon=1.0):
    """Seed 001 ``poly1_cross_entropy_tf`` in PyTorch: ``CE + epsilon * (1 - p_t)``.

    Changes: TF ops replaced by their PyTorch equivalents, as in :func:`cross_entropy_tf`.
    """
    labels = F.one_hot(labels, class_number).to(logits.dtype)
    ce_loss = -(labels * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    poly1 = torch.sum(labels * F.softmax(logits, dim=-1), dim=-1)
    poly1_loss = ce_loss + epsilon * (1 - poly1)
    return poly1_loss


def poly1_cross_entropy_torch(logits, labels, class_number=3, epsilon=1.0):
    """Seed 001 ``poly1_cross_entropy_torch``: ``CE + epsilon * (1 - p_t)``.

    Changes: ``F.softmax(logits)`` (implicit dim, deprecated) -> ``dim=-1``; ``torch.tensor(x)``
    on tensors dropped; the one-hot is cast to the logits' dtype (printed: ``.float()``).
    """
    poly1 = torch.sum(F.one_hot(labels, class_number).to(logits.dtype) * F.softmax(logits, dim=-1), dim=-1)
    ce_loss = F.cross_entropy(logits, labels, reduction='none')
    poly1_ce_loss = ce_loss + epsilon * (1 - poly1)
    return poly1_ce_loss


class FocalLoss(nn.Module):
    """Seed 001 PyTorch ``FocalLoss``: ``-alpha_y * (1 - p_t)^gamma * log p_t`` per sample, no reduction.

    ``alpha`` scalar: class 0 gets ``alpha``, every other class ``1 - alpha``.

    Changes from the printed code: ``forward`` no longer overwrites ``self.alpha`` with the
    gathered per-sample values (printed: ``self.alpha = self.alpha.gather(0, labels.view(-1))``,
    which breaks, or silently gives wrong weights, on the second call); the per-sample alpha is
    a local variable. The alpha table is created in the logits' dtype at call time (printed:
    float32 ``torch.zeros(num_classes)``).
    """

    def __init__(self, alpha=0.25, gamma=2, num_classes=3):
        super(FocalLoss, self).__init__()
        self.alpha = torch.zeros(num_classes, dtype=torch.float64)
        self.alpha[0] += alpha
        self.alpha[1:] += (1 - alpha)
        self.gamma = gamma

    def forward(self, logits, labels):
        logits = logits.view(-1, logits.size(-1))
        alpha = self.alpha.to(device=logits.device, dtype=logits.dtype)
        logits_logsoft = F.log_softmax(logits, dim=1)
        logits_softmax = torch.exp(logits_logsoft)
        logits_softmax = logits_softmax.gather(1, labels.view(-1, 1))
        logits_logsoft = logits_logsoft.gather(1, labels.view(-1, 1))
        alpha = alpha.gather(0, labels.view(-1))
        loss = -torch.mul(torch.pow((1 - logits_softmax), self.gamma), logits_logsoft)
        loss = torch.mul(alpha, loss.t())[0, :]
        return loss


def poly1_focal_loss_torch(logits, labels, alpha=0.25, gamma=2, num_classes=3, epsilon=1.0):
    """Seed 001 ``poly1_focal_loss_torch``: the seed's *hybrid* Poly-1 focal loss.

    Softmax focal loss (:class:`FocalLoss`) plus a *sigmoid*-based term
    ``mean_c epsilon * (1 - q_c)^(gamma + 1)``, ``q_c = sigmoid(z_c)`` for the labelled class and
    ``1 - sigmoid(z_c)`` for the others. This is what gives the printed ``[1.4649665, 0.1818437]``;
    it is not the paper's Poly-1 focal form ``FL + epsilon * (1 - p_t)^(gamma + 1)``, which
    segfocal implements.

    Changes: the printed exponent ``2 + 1`` is written ``gamma + 1`` (equal for the printed
    gamma = 2); ``torch.nn.functional.sigmoid`` (deprecated) -> ``torch.sigmoid``;
    ``torch.tensor(labels, dtype=torch.float32)`` -> ``.to(logits.dtype)``.
    """
    focal_loss_func = FocalLoss(alpha, gamma, num_classes)
    focal_loss = focal_loss_func(logits, labels)

    p = torch.sigmoid(logits)
    labels = torch.nn.functional.one_hot(labels, num_classes)
    labels = labels.to(logits.dtype)
    poly1 = labels * p + (1 - labels) * (1 - p)
    poly1_focal_loss = focal_loss + torch.mean(epsilon * torch.pow(1 - poly1, gamma + 1), dim=-1)
    return poly1_focal_loss
