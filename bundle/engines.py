"""The SegAN adversarial trainer: a MONAI ``Trainer`` whose iteration plays the min-max game of section 2.3."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer, Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.losses import DiceLoss
from monai.utils.enums import CommonKeys as Keys
from torch.nn import DataParallel
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from .losses import MultiScaleL1Loss
from .networks import SegANCritics

__all__ = [
    "AlternatingTrainer",
    "AutocastSupervisedTrainer",
    "SegANTrainer",
    "LossShareLogger",
    "CRITIC_LOSS",
    "ADVERSARIAL_LOSS",
    "LOSS_TERMS",
]

#: Engine output key of the critic's loss (the multi-scale L1 loss it maximises).
CRITIC_LOSS = "critic_loss"
#: Engine output key of the segmentor's adversarial term (``CommonKeys.LOSS`` also holds the Dice term).
ADVERSARIAL_LOSS = "adversarial_loss"
#: Engine output key of each (critic, layer)'s contribution to the adversarial loss, shape (critics, layers),
#: summing to it (``MultiScaleL1Loss.terms``): per region with S3-3C, whether the deeper layers carry any of it.
LOSS_TERMS = "loss_terms"


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, or the module itself."""
    return module.module if isinstance(module, (DistributedDataParallel, DataParallel)) else module


class AlternatingTrainer(Trainer):
    """A ``Trainer`` whose iteration alternates updates of several networks, each with its own optimiser.

    Holds what such iterations share, so each adversarial trainer writes only its game: one AMP context and
    one gradient scaler for all updates, and the batch preparation of ``SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        optim_set_to_none: bool = True,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        """Takes ``SupervisedTrainer``'s arguments (``train_data_loader``, ``key_train_metric``,
        ``train_handlers``, ``optim_set_to_none``, ...) and hands them to ``Trainer`` under its own names."""
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.optim_set_to_none = optim_set_to_none

    def _prepare(self, batchdata: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's image and label on the engine's device; starts ``state.output`` with both."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
        image, label = batch[0], batch[1]
        self.state.output = {Keys.IMAGE: image, Keys.LABEL: label}
        return image, label

    @property
    def _scaling(self) -> bool:
        """Whether updates go through the gradient scaler: AMP with an enabled scaler (CUDA float16; the
        scaler MONAI creates disables itself without a GPU, and bfloat16 needs none)."""
        return bool(self.amp and self.scaler is not None and self.scaler.is_enabled())

    def _autocast(self):
        """Mixed precision around the networks only, on the engine's device type (CUDA, or the CPU where
        bfloat16 autocast runs, so the GPU numerics are testable without a GPU); probabilities, masks and
        losses are computed in float32 outside it."""
        if not self.amp:
            return contextlib.nullcontext()
        device_type = torch.device(self.state.device).type
        return torch.autocast(device_type, **(self.amp_kwargs or {}))

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self._scaling else loss).backward()

    def _update(self, optimizer: Optimizer) -> None:
        if self._scaling:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def _end_updates(self) -> None:
        """Once per iteration, after the last update: let the gradient scaler adapt its scale."""
        if self._scaling:
            self.scaler.update()


class AutocastSupervisedTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` (the U-net baseline) whose ``amp`` autocasts on the engine's device type.

    MONAI's trainer autocasts on CUDA only; this one also runs bfloat16 autocast on a CPU, so the baselines
    train under the same arithmetic as the adversarial trainers on every device (its loss casts to float32, and
    the logits it outputs are float32).
    """

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> dict:
        device_type = torch.device(engine.state.device).type
        if not engine.amp or device_type == "cuda":
            output = super()._iteration(engine, batchdata)
        else:
            with torch.autocast(device_type, **(engine.amp_kwargs or {})):
                output = super()._iteration(engine, batchdata)
        output[Keys.PRED] = output[Keys.PRED].float()  # logits for handlers and metrics, as the other trainers'
        return output


class SegANTrainer(AlternatingTrainer):
    """Alternating critic / segmentor training with the multi-scale L1 loss (Xue et al. 2018, section 2.3).

    Each iteration:

    1. the segmentor predicts probability maps ``S(x) = sigmoid(network(x))``;
    2. **critic step** with S fixed: ``-L`` is minimised, i.e. the critics *maximise* the multi-scale loss
       between ``x o S(x)`` (detached) and ``x o y``; then every critic weight is clamped to ``[-clip, clip]``.
       When the loss does not depend on the critics (S3-3C-s0 compares only the masked inputs, layer 0) there
       is nothing to ascend and the step is skipped;
    3. **segmentor step** with C fixed: ``L`` (plus ``dice_weight`` times a soft Dice loss, optional) is
       minimised, the gradient reaching S only through the critics.

    The engine output holds ``image``, ``label``, ``pred`` (probabilities), ``loss`` (the segmentor's total
    loss), ``adversarial_loss``, ``critic_loss`` and ``loss_terms`` (each critic layer's part of the
    adversarial loss); ``IterationEvents`` fire as in ``SupervisedTrainer``
    (forward, loss and backward completed for the segmentor step, model completed after both updates).

    Args:
        device: where the networks run.
        max_epochs: epochs to train.
        train_data_loader: yields batches of 2D slices, ``image`` (B, C, H, W) and ``label`` (B, R, H, W).
        network: the segmentor (returns logits).
        critic: the critics (``SegANCritics``, possibly wrapped in ``DistributedDataParallel``), whose
            ``forward(image, maps)`` gives one feature list each.
        optimizer: the segmentor's optimiser.
        critic_optimizer: the critics' optimiser.
        loss_function: the multi-scale L1 loss; default ``MultiScaleL1Loss("all")``.
        clip: critic weight clamp (the paper: 0.01); ``None`` or 0 disables it.
        dice_weight: weight of a soft Dice term added to the segmentor loss (0 = the paper). Public
            re-implementations add it to stabilise the game.
        critic_steps: critic updates per segmentor update (the paper: 1).
        other arguments: as ``monai.engines.SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        critic: SegANCritics,
        optimizer: Optimizer,
        critic_optimizer: Optimizer,
        loss_function: MultiScaleL1Loss | None = None,
        clip: float | None = 0.01,
        dice_weight: float = 0.0,
        critic_steps: int = 1,
        **trainer_kwargs: Any,
    ) -> None:
        if critic_steps < 1:
            raise ValueError(f"critic_steps must be >= 1, got {critic_steps}.")
        if dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight}.")
        super().__init__(device, max_epochs, train_data_loader, **trainer_kwargs)
        self.network = network
        self.critic = critic
        self.optimizer = optimizer
        self.critic_optimizer = critic_optimizer
        self.loss_function = MultiScaleL1Loss() if loss_function is None else loss_function
        self.clip = clip
        self.dice_weight = dice_weight
        self.dice_loss = DiceLoss(sigmoid=False, smooth_nr=1e-5, smooth_dr=1e-5)
        self.critic_steps = critic_steps

    def _iteration(self, engine: SegANTrainer, batchdata: dict[str, Any]) -> dict:
        image, label = engine._prepare(batchdata)
        engine.network.train()
        engine.critic.train()

        with engine._autocast():
            logits = engine.network(image)
        pred = torch.sigmoid(logits.float())  # float32 maps: bfloat16 would flatten the sigmoid from a logit of ~5.5
        engine.state.output[Keys.PRED] = pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        # critic step(s): S fixed, C ascends the loss
        critic = _unwrap(engine.critic)
        critic.requires_grad_(True)
        fake = pred.detach()
        for _ in range(engine.critic_steps):
            engine.critic_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with engine._autocast():
                fake_feats, real_feats = engine.critic(image, fake), engine.critic(image, label)
            critic_loss = engine.loss_function(fake_feats, real_feats)
            if not critic_loss.requires_grad:
                break  # no critic parameter in the loss's graph (loss_layers "first"): nothing to ascend
            engine._backward(-critic_loss)
            engine._update(engine.critic_optimizer)
            engine._end_updates()  # a gradient scaler steps an optimiser at most once per update()
            if engine.clip:
                critic.clamp_(engine.clip)

        # segmentor step: C fixed, S descends the same loss through C. The bare critic is called (not its DDP
        # wrapper, under torchrun): it gets no gradient here, so there is nothing for DDP to synchronise.
        critic.requires_grad_(False)
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            with torch.no_grad():
                real_feats = critic(image, label)
            fake_feats = critic(image, pred)
        terms = engine.loss_function.terms(fake_feats, real_feats)
        adversarial = terms.sum()
        loss = adversarial
        if engine.dice_weight:
            loss = loss + engine.dice_weight * engine.dice_loss(pred, label.float())
        engine.state.output[Keys.LOSS] = loss
        engine.state.output[ADVERSARIAL_LOSS] = adversarial.detach()
        engine.state.output[CRITIC_LOSS] = critic_loss.detach()
        engine.state.output[LOSS_TERMS] = terms.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine._backward(loss)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = loss.detach()  # logged as a number: the graph is spent
        engine._update(engine.optimizer)
        engine._end_updates()
        critic.requires_grad_(True)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class LossShareLogger:
    """Log, every epoch, which share of its critic's adversarial loss each critic layer carried (per region).

    Sums the trainer's ``loss_terms`` output over the epoch and logs one line per critic, each summing to 1, e.g.
    ``whole_tumor: 0.41 0.27 0.19 0.13`` for layers 0 (the masked input) to 3. A loss carried almost wholly
    by layer 0 means the critics have stopped shaping it (see ``clip_params``). The last epoch's shares are
    kept in ``engine.state.loss_shares`` as ``{critic name: [share per layer]}``.

    Args:
        critic_names: one name per critic (the region names for S3-3C); default ``critic0, critic1, ...``.
    """

    def __init__(self, critic_names: Sequence[str] | None = None, name: str = "LossShareLogger") -> None:
        self.critic_names = list(critic_names) if critic_names is not None else None
        self.logger = logging.getLogger(name)
        self._total: torch.Tensor | None = None

    def attach(self, engine: Trainer) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, _engine: Trainer) -> None:
        self._total = None

    def _accumulate(self, engine: Trainer) -> None:
        output = engine.state.output
        if not isinstance(output, dict) or LOSS_TERMS not in output:
            return  # a trainer without a multi-scale loss (an overlay's pixel-loss baseline): nothing to log
        terms = output[LOSS_TERMS].detach().float().cpu()
        self._total = terms if self._total is None else self._total + terms

    def __call__(self, engine: Trainer) -> None:
        if self._total is None:
            return
        shares = self._total / self._total.sum(dim=1, keepdim=True).clamp_min(1e-12)  # each critic's row sums to 1
        names = self.critic_names if self.critic_names and len(self.critic_names) == len(shares) else None
        names = names or [f"critic{i}" if len(shares) > 1 else "critic" for i in range(len(shares))]
        engine.state.loss_shares = {n: [round(float(v), 4) for v in row] for n, row in zip(names, shares)}
        lines = "; ".join(f"{n}: " + " ".join(f"{v:.3f}" for v in row) for n, row in engine.state.loss_shares.items())
        self.logger.info(
            f"Epoch {engine.state.epoch}: share of the adversarial loss per critic layer (0 = masked input): {lines}"
        )
