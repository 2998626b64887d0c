"""The one training loop: pre-training, SFT and STS all run here, driven by an objective.

One step is one optimizer update over `grad_accum` micro-batches on each of `world_size`
processes (`sllm.train.plan`). Batches, learning rate and dropout (the RNG re-seeded from
(seed, step, index)) are functions of the step, so a checkpoint needs only weights, optimizer
state and counters, and a resumed run equals an uninterrupted one bit for bit on the CPU.
The caller's config is never changed; the derived values go to `plan.json`.
"""

from __future__ import annotations

import gc
import math
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from sllm.atomic import directory_lock, ensure_writable_dir, writing_to
from sllm.config import Config, save_config
from sllm.errors import UserError
from sllm.model import count_parameters
from sllm.model.cpu_linear import onednn_linears
from sllm.model.stats import gpu_peak_flops, training_flops_per_token
from sllm.progress import progress_bar
from sllm.run import (
    BEST,
    CHECKPOINTS,
    CONFIG_FILE,
    LATEST,
    LOCK_FILE,
    TOKENIZER_FILE,
    CheckpointMeta,
    all_finite,
    epoch_name,
    load_latest,
    refuse_foreign_dir,
    step_name,
)
from sllm.runtime import allow_tf32, cpu_bf16_hint, keep_freed_memory, select_autocast_dtype, select_device
from sllm.train.batch_size import (
    available_ram_bytes,
    largest_fitting,
    per_process_batch,
    power_of_two_sizes,
    survives,
)
from sllm.train.checkpoint import clean_leftovers, save_checkpoint, training_state, write_checkpoint
from sllm.train.distributed import (
    any_rank,
    barrier,
    full_state,
    gradient_sync,
    join_cluster,
    leave_cluster,
    load_full_state,
    mean_over_ranks,
    min_over_ranks,
    wrap_model,
)
from sllm.train.memory_check import require_memory
from sllm.train.monitor import MetricSinks, check_sinks_available
from sllm.train.objectives import Batch, BatchSource, LanguageModeling, Objective
from sllm.train.optim import lr_factor, optimizer_hint
from sllm.train.plan import resolve_plan
from sllm.train.resume import changed_settings, init_from_checkpoint, resume_checkpoint
from sllm.train.samples import write_samples
from sllm.train.signals import StopRequest


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens_seen: int
    val_loss: float | None  # of the last evaluation, at val_step (not always the last step)
    stopped_by: str | None = None
    val_step: int | None = None
    already_finished: bool = False
    is_main: bool = True


class Trainer:
    """Model, optimizer and batches of one run; `run()` trains from the current step to the end."""

    def __init__(self, cfg: Config, objective: Objective, log=print) -> None:
        self.objective, self.log = objective, log
        self.cfg = replace(cfg, model=objective.model_config)  # as run; the caller's stays as given
        t = cfg.train
        self.run_dir = Path(t.out_dir)
        self.cluster, self.device = join_cluster(select_device(t.device), t.dist_timeout_s)
        allow_tf32(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.amp_dtype = select_autocast_dtype(self.device, t.dtype)
        self.plan = resolve_plan(t, objective, self.cluster.world_size)
        self.schedule = replace(t, max_steps=self.plan.max_steps)  # what lr_factor reads
        require_memory(objective, t, self.plan.micro_batch or 1, self.device, self.amp_dtype, self.cluster)

        torch.manual_seed(t.seed)
        self.model = objective.build_model().to(self.device)
        objective.start(self.model, self.device)
        self.ddp_model = wrap_model(self.model, self.cluster, self.device, t.parallel)
        # A sharded model needs every rank in each forward pass, evaluation included.
        self.collective_eval = self.cluster.distributed and t.parallel == "fsdp"
        self.flops_per_token = training_flops_per_token(
            self.model, self.cfg.model, self.plan.tokens_per_sample
        )
        self.peak_flops = (
            gpu_peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        )
        if t.compile:
            self.ddp_model = torch.compile(self.ddp_model)
        self._build_optimizers()
        self.step, self.tokens_seen, self.best_rank = 0, 0, math.inf
        self.finite_losses = torch.ones((), dtype=torch.bool, device=self.device)
        self.last_val_loss, self.last_val_step = None, None
        self.last_val_metrics: dict[str, float] = {}
        self.batches = None if self.plan.micro_batch is None else self._batch_source()

    def _build_optimizers(self) -> None:
        """Fresh optimizers and loss scaler; peak rates kept apart (a resumed state holds the current)."""
        self.optimizers = self.objective.optimizers(self.model, self.cfg.train, self.device)
        self.peak_lrs = [[group["lr"] for group in o.param_groups] for o in self.optimizers]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _batch_source(self) -> BatchSource:
        return self.objective.batches(self.plan.micro_batch, self.plan.batch_size, self.cfg.train.seed)

    # ---- micro-batch ----------------------------------------------------------------

    def settle_micro_batch(self) -> None:
        """`train.micro_batch: auto` becomes a number in the plan (unless resume took one)."""
        if self.plan.micro_batch is None:
            self.plan = self.plan.with_micro_batch(self._search_micro_batch())
            self.batches = self._batch_source()
            if self.cluster.is_main:
                p = self.plan
                self.log(
                    f"micro-batch auto: {p.micro_batch} sequences × {p.grad_accum} accumulation × "
                    f"{p.world_size} processes = {p.batch_size} sequences per step"
                )

    def _search_micro_batch(self) -> int:
        """The largest power-of-two micro-batch that fits on every rank; trials' changes are undone."""
        sizes = power_of_two_sizes(per_process_batch(self.plan.batch_size, self.cluster.world_size))
        if self.device.type == "cpu":
            budget = available_ram_bytes() // 2
            sizes = [size for size in sizes if self._estimated_bytes(size) <= budget]
        initial_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        found = largest_fitting(sizes, survives(self._trial_step))
        self.model.load_state_dict(initial_weights)
        self.model.zero_grad(set_to_none=True)
        self._build_optimizers()
        found = min_over_ranks(found, self.cluster, self.device)
        if not found:
            raise UserError(
                f"train.micro_batch: auto: one sequence of {self.plan.tokens_per_sample} tokens already "
                f"runs out of memory on {self.device.type}; shorten train.block_size, shrink the model "
                "or turn on train.activation_checkpointing"
            )
        return found

    def _estimated_bytes(self, micro_batch: int) -> int:
        """The objective's estimate (0 when it has none), whose bf16 activations double in fp32."""
        memory = self.objective.memory(self.model, micro_batch)
        if memory is None:
            return 0
        return memory.total_bytes + (memory.activations_bytes if self.amp_dtype is None else 0)

    def _trial_step(self, micro_batch: int) -> None:
        source = self.objective.batches(micro_batch, self.plan.batch_size, self.cfg.train.seed)
        self._backward(source.batch(0, 0), sync=False, share=1)
        self._apply_gradients()

    # ---- state ----------------------------------------------------------------------

    def resume(self) -> bool:
        """Load the newest verified checkpoint if there is one; True when something was loaded."""
        optimizer = self.cfg.train.optimizer
        checkpoint = resume_checkpoint(self.run_dir, self.cfg.model, optimizer)
        if checkpoint is None:
            return False
        state = checkpoint.train_state()
        try:
            load_full_state(
                self.model, self.optimizers, checkpoint.weights_for(self.model), state["optimizers"]
            )
        except (KeyError, ValueError) as error:  # a checkpoint older than its meta's "optimizer"
            raise UserError(
                f"resume: the optimizer state in {checkpoint.path} does not fit train.optimizer="
                f"{optimizer} ({type(error).__name__}: {error}); resume with the optimizer the run "
                "was trained with"
            ) from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.best_rank = float(state["best_rank"])
        if self.plan.micro_batch is None:  # auto: another micro-batch would read other windows
            if checkpoint.meta.micro_batch is None:
                raise UserError(
                    f"{checkpoint.path} does not record its micro-batch; set train.micro_batch to the "
                    "one it used"
                )
            self.plan = self.plan.with_micro_batch(checkpoint.meta.micro_batch)
            self.batches = self._batch_source()
        if self.cluster.is_main:
            self.log(f"resumed from {checkpoint.path} (step {self.step}, {self.tokens_seen:,} tokens seen)")
            for note in changed_settings(checkpoint.meta, self.plan, self.cfg.train, self.step):
                self.log(note)
        return True

    def initialize_from(self, source_run: Path) -> None:
        """Take another run's newest weights (e.g. a base model for domain training)."""
        checkpoint = init_from_checkpoint(
            source_run, self.cfg.model, self.objective.tokenizer.sha256, self.cfg.data.dir
        )
        load_full_state(self.model, self.optimizers, checkpoint.weights_for(self.model), None)
        if self.cluster.is_main:
            self.log(f"initialized from {checkpoint.path} (a fresh optimizer and schedule)")

    def _state(self) -> tuple[dict, dict, CheckpointMeta]:
        """Weights, training state and meta for a checkpoint (collective under FSDP)."""
        model_state, optimizer_state = full_state(self.model, self.optimizers)
        state = training_state(optimizer_state, self.scaler, self.step, self.tokens_seen, self.best_rank)
        meta = CheckpointMeta(
            step=self.step, tokens_seen=self.tokens_seen, model_config=asdict(self.cfg.model),
            tokenizer_sha256=self.objective.tokenizer.sha256, objective=self.plan.objective,
            val_loss=self.last_val_loss, val_step=self.last_val_step, val_metrics=self.last_val_metrics,
            optimizer=self.cfg.train.optimizer, schedule=self.cfg.train.schedule,
            max_steps=self.plan.max_steps, tokens_per_step=self.plan.tokens_per_step,
            micro_batch=self.plan.micro_batch,
        )  # fmt: skip
        return model_state, state, meta

    def save(self, name: str) -> None:
        """A checkpoint: all ranks gather (FSDP); rank 0 checks the weights are finite, then writes."""
        state = self._state() if self.collective_eval or self.cluster.is_main else None
        broken = self.cluster.is_main and not all_finite(state[0].values())
        if any_rank(broken, self.cluster, self.device):
            raise self._diverged("its weights are no longer finite numbers")
        if self.cluster.is_main:
            save_checkpoint(self.run_dir, *state, keep_last=self.cfg.train.keep_last, name=name)

    def require_finite_loss(self) -> None:
        """Stops a diverged run before its loss reaches a log, an evaluation or a checkpoint."""
        if any_rank(not bool(self.finite_losses), self.cluster, self.device):
            raise self._diverged("its loss became NaN or infinite")
        self.finite_losses = torch.ones((), dtype=torch.bool, device=self.device)

    def _diverged(self, what: str) -> UserError:
        t = self.cfg.train
        latest = self.run_dir / CHECKPOINTS / LATEST
        kept = latest.read_text(encoding="utf-8").strip() if latest.is_file() else "none yet"
        return UserError(
            f"training diverged by step {self.step}: {what}; nothing after the last checkpoint "
            f"({kept}) was saved. Lower train.lr (now {t.lr:g}), set train.grad_clip (now "
            f"{t.grad_clip:g}) or lengthen train.warmup_steps (now {t.warmup_steps}), then run again"
        )

    def checkpoint_name(self, must_save: bool) -> str | None:
        """The checkpoint this step ends with, if any: `epoch-N` when it completed epoch N (by tokens),
        else `step-N` at the interval or when the run ends or stops here."""
        t, plan = self.cfg.train, self.plan
        if t.checkpoint_every == "epoch":
            epoch = self.tokens_seen // plan.tokens_per_epoch
            if epoch > (self.tokens_seen - plan.tokens_per_step) // plan.tokens_per_epoch:
                return epoch_name(epoch)
        elif self.step % t.checkpoint_interval == 0:
            return step_name(self.step)
        return step_name(self.step) if must_save else None

    # ---- one step -------------------------------------------------------------------

    def train_step(self) -> torch.Tensor:
        """One optimizer update; returns the mean micro-batch loss (a tensor: no host sync)."""
        seed, grad_accum = self.cfg.train.seed, self.plan.grad_accum
        factor = lr_factor(self.step, self.schedule)
        for optimizer, peaks in zip(self.optimizers, self.peak_lrs, strict=True):
            for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                group["lr"] = peak * factor
        total = torch.zeros((), device=self.device)
        for micro_step in range(grad_accum):
            index = micro_step * self.cluster.world_size + self.cluster.rank
            torch.manual_seed((seed * 1_000_003 + self.step) * 1_009 + index)  # dropout
            batch = self.batches.batch(self.step, index)
            total += self._backward(batch, sync=micro_step == grad_accum - 1, share=grad_accum)
        self._apply_gradients()
        self.finite_losses &= torch.isfinite(total)
        self.step += 1
        self.tokens_seen += self.plan.tokens_per_step
        return total / grad_accum

    def _backward(self, batch: Batch, sync: bool, share: int) -> torch.Tensor:
        """Forward and backward of one micro-batch whose loss counts `1 / share` of the step's."""
        if self.device.type == "cuda":  # pinned: the copy overlaps the previous micro-batch's work
            batch = tuple(tensor.pin_memory() for tensor in batch)
        batch = tuple(tensor.to(self.device, non_blocking=True) for tensor in batch)
        checkpointing = self.cfg.train.activation_checkpointing
        with gradient_sync(self.ddp_model, sync), onednn_linears(self.device, checkpointing):
            loss = self.objective.loss(self.ddp_model, batch, self.device, self.amp_dtype)
            self.scaler.scale(loss / share).backward()
        return loss.detach()

    def _apply_gradients(self) -> None:
        """Clip, step every optimizer, update the loss scale, clear the gradients."""
        t = self.cfg.train
        if t.grad_clip > 0:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def evaluate(self, sinks: MetricSinks) -> None:
        """Evaluation, best checkpoint and samples: on rank 0, or on every rank with a sharded model."""
        if not (self.cluster.is_main or self.collective_eval):
            return
        self.model.eval()
        evaluation = self.objective.evaluate(
            self.model, self.device, self.amp_dtype, self.cfg.eval.batch_size
        )
        samples = []
        if self.cfg.log.samples_at_eval:
            samples = self.objective.samples(self.model, self.device, self.amp_dtype)
        self.model.train()
        if evaluation is not None:
            self.last_val_loss, self.last_val_step = evaluation.val_loss, self.step
            self.last_val_metrics = evaluation.metrics
            epoch = self.tokens_seen / self.plan.tokens_per_epoch
            sinks.log(self.step, {**evaluation.metrics, "tokens": self.tokens_seen, "epoch": epoch})
            if evaluation.summary and self.cluster.is_main:
                self.log(f"step {self.step} (epoch {epoch:.3g}): {evaluation.summary}")
            if evaluation.rank is not None and evaluation.rank < self.best_rank:
                self.best_rank = evaluation.rank
                state = self._state()
                if self.cluster.is_main:
                    write_checkpoint(self.run_dir / CHECKPOINTS / BEST, *state)
        if samples and self.cluster.is_main:
            path = write_samples(self.run_dir, self.step, samples)
            sinks.text(self.step, "samples", path.read_text(encoding="utf-8"))

    # ---- the loop -------------------------------------------------------------------

    def _log_progress(self, loss: torch.Tensor, tokens_per_s: float, sinks: MetricSinks, bar: tqdm) -> None:
        """Mean loss over ranks (a logged step's one host sync) to the sinks and the bar."""
        metrics = {
            "loss": float(mean_over_ranks(loss, self.cluster)),
            "lr": self.optimizers[0].param_groups[0]["lr"],
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "epoch": self.tokens_seen / self.plan.tokens_per_epoch,
        }
        if self.peak_flops:
            metrics["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.cluster.world_size)
        sinks.log(self.step, metrics)
        bar.set_postfix(
            loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}"
        )

    def _publish_artifacts(self, sinks: MetricSinks) -> None:
        """The finished run's tokenizer, config and final/best checkpoints, as versioned files."""
        checkpoints = self.run_dir / CHECKPOINTS
        sinks.files("tokenizer", "tokenizer", [self.run_dir / TOKENIZER_FILE])
        sinks.files("config", "config", [self.run_dir / CONFIG_FILE])
        final = checkpoints / (checkpoints / LATEST).read_text(encoding="utf-8").strip()
        sinks.files("final", "model", [final])
        if (checkpoints / BEST).is_dir():
            sinks.files("best", "model", [checkpoints / BEST])

    def run(self) -> TrainResult:
        t, plan = self.cfg.train, self.plan
        main = self.cluster.is_main
        if main:
            model = f"{self.objective.describe(self.model)} on {self.device.type}"
            self.log(f"{model}, {plan.tokens_per_step:,} tokens per step")
            bf16_hint = cpu_bf16_hint(self.device, self.amp_dtype, count_parameters(self.model))
            for hint in filter(None, (bf16_hint, optimizer_hint(t))):
                self.log(hint)
        sinks = MetricSinks(self.run_dir, self.cfg, self.step, enabled=main)
        show_bar = self.cfg.log.progress and main
        bar = progress_bar(total=plan.max_steps, initial=self.step, desc=self.objective.name, show=show_bar)
        self.model.train()
        stopped_by = None
        window_start, window_steps = time.perf_counter(), 0
        try:
            with StopRequest() as stop:
                while self.step < plan.max_steps:
                    loss = self.train_step()
                    window_steps += 1
                    bar.update(1)
                    last = self.step == plan.max_steps
                    logs = self.step % t.log_interval == 0 or last
                    evaluates = (t.eval_interval and self.step % t.eval_interval == 0) or last
                    checked = logs or evaluates
                    if checked:
                        self.require_finite_loss()
                    if logs:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        self._log_progress(loss, window_steps * plan.tokens_per_step / elapsed, sinks, bar)
                        window_start, window_steps = time.perf_counter(), 0
                    if evaluates:
                        self.evaluate(sinks)
                    stopping = any_rank(stop.requested, self.cluster, self.device)
                    checkpoint = self.checkpoint_name(must_save=last or stopping)
                    if checkpoint:
                        if not checked:
                            self.require_finite_loss()
                        self.save(checkpoint)
                    if stopping:
                        stopped_by = stop.signal_name or "a stop signal on another rank"
                        break
            if main and self.step == plan.max_steps:
                self._publish_artifacts(sinks)
        finally:
            bar.close()
            sinks.close()
        if stopped_by and main:
            where = f"saved step {self.step} to {self.run_dir}"
            self.log(f"{stopped_by} received: {where}; run the same command to resume")
        return TrainResult(
            self.run_dir, self.step, self.tokens_seen, self.last_val_loss, stopped_by,
            val_step=self.last_val_step, is_main=main,
        )  # fmt: skip


def run_objective(cfg: Config, objective: Objective, log=print) -> TrainResult:
    """Train, resume or confirm finished the run of `cfg` on `objective`, alone or as a torchrun rank."""
    trainer = Trainer(cfg, objective, log)
    try:
        result = _train(trainer, log)
        barrier(trainer.cluster)  # every rank is done before any tears the process group down
        return result
    finally:
        # DDP's reducer holds the process group; freed after its peer has exited, the gloo
        # group's destructor waits forever, so it goes first, while every rank is alive.
        trainer.ddp_model = None
        gc.collect()
        leave_cluster(trainer.cluster)


def train(cfg: Config, log=print) -> TrainResult:
    """`sllm train`: language modelling on the prepared data of `cfg.data.dir`."""
    return run_objective(cfg, LanguageModeling(cfg), log)


def _train(trainer: Trainer, log) -> TrainResult:
    """Rank 0 holds the run directory's lock throughout, and a full disk under it is one line."""
    cfg, run_dir, main = trainer.cfg, trainer.run_dir, trainer.cluster.is_main
    check_sinks_available(cfg)
    if main:
        refuse_foreign_dir(run_dir)
    if cfg.train.resume == "never" and load_latest(run_dir) is not None:
        raise UserError(f"{run_dir} already has checkpoints; use a new --out or train.resume=auto")
    with ExitStack() as guards:
        if main:
            ensure_writable_dir(run_dir, "run directory")
            guards.enter_context(writing_to(run_dir, "run files"))
            guards.enter_context(directory_lock(run_dir / LOCK_FILE, "training run"))
            clean_leftovers(run_dir)
            trainer.objective.write_run_files(run_dir)
        barrier(trainer.cluster)
        resumed = cfg.train.resume == "auto" and trainer.resume()
        if not resumed and cfg.train.init_from:
            trainer.initialize_from(Path(cfg.train.init_from))
        trainer.settle_micro_batch()
        if main:
            save_config(cfg, run_dir / CONFIG_FILE)
            trainer.plan.write(run_dir)
            log(trainer.plan.describe())
        if resumed and trainer.step >= trainer.plan.max_steps:
            if main:
                log(f"{run_dir} already finished: step {trainer.step} of {trainer.plan.max_steps}")
            return TrainResult(run_dir, trainer.step, trainer.tokens_seen, None, already_finished=True)
        return trainer.run()
