"""The training loop.

One step is one optimizer update over `grad_accum` micro-batches (with `train.batch_size`
accumulation is derived, and `train.micro_batch: auto` searches the micro-batch: see
`sllm.train.batch_size`). Everything that decides
what a step computes is a function of the step number: the windows read
(`TrainWindows.batch(step, micro_step)`), the learning rate (`lr_at(step)`) and dropout
(the torch RNG is re-seeded from (seed, step)). A checkpoint therefore needs only the
weights, the optimizer state and counters, and a resumed run equals an uninterrupted one
bit for bit on the CPU.

The run directory gets the resolved config and a copy of the tokenizer first, so it is
self-contained; checkpoints, metrics.jsonl, TensorBoard events and samples follow.
"""

from __future__ import annotations

import gc
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sllm.atomic import ensure_writable_dir
from sllm.config import Config, TrainConfig, save_config
from sllm.data.loader import TrainWindows, fixed_windows, open_split
from sllm.data.meta import DataMeta
from sllm.data.mixture import TrainMixture
from sllm.errors import UserError
from sllm.evaluate import score_windows
from sllm.model import build_model, count_parameters, describe
from sllm.model.cpu_linear import onednn_linears
from sllm.model.stats import gpu_peak_flops, training_flops_per_token, training_memory
from sllm.runs import CONFIG_FILE
from sllm.runtime import (
    allow_tf32,
    autocast,
    cpu_bf16_hint,
    keep_freed_memory,
    select_autocast_dtype,
    select_device,
)
from sllm.tokenizer import TOKENIZER_FILE, load_tokenizer
from sllm.train.batch_size import (
    accumulation_steps,
    available_ram_bytes,
    largest_fitting,
    no_micro_batch_fits,
    per_process_batch,
    power_of_two_sizes,
    survives,
)
from sllm.train.checkpoint import (
    BEST,
    CHECKPOINTS,
    LATEST,
    Checkpoint,
    all_finite,
    clean_leftovers,
    config_differences,
    epoch_name,
    load_latest,
    save_best,
    save_checkpoint,
    step_name,
)
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
from sllm.train.monitor import MetricSinks, check_sinks_available
from sllm.train.optim import build_optimizers, lr_at, optimizer_hint, set_learning_rates
from sllm.train.samples import sample_prompts, write_samples
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


def _resolve_model_config(cfg: Config, meta: DataMeta) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta.vocab_size
    elif cfg.model.vocab_size < meta.vocab_size:
        raise UserError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's vocabulary "
            f"({meta.vocab_size}); set it to 0 to take the data's"
        )


def _resolve_step_budget(t: TrainConfig, tokens_per_step: int, tokens_per_epoch: int) -> None:
    """A token or epoch budget becomes a step count, so schedules and checkpoints count steps."""
    budget = t.max_tokens or round(t.epochs * tokens_per_epoch)
    if budget:
        t.max_steps = max(1, math.ceil(budget / tokens_per_step))


def _prepare_run_dir(run_dir: Path, data_dir: Path) -> None:
    """Write config.yaml and tokenizer.json; refuse a run dir trained on another tokenizer."""
    if (run_dir / TOKENIZER_FILE).is_file() and (
        load_tokenizer(run_dir).sha256 != load_tokenizer(data_dir).sha256
    ):
        raise UserError(f"{run_dir} was trained with another tokenizer than {data_dir}; use a new --out")
    shutil.copyfile(data_dir / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)


def logits_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: torch.dtype | None
) -> torch.Tensor:
    """Mean next-token cross-entropy from the full logits, taken in fp32."""
    with autocast(device, dtype):
        logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def chunked_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: torch.dtype | None
) -> torch.Tensor:
    """The same loss computed inside the model's forward (`train.chunked_loss`): the LM head and
    the loss run chunk by chunk, and DDP/FSDP still see one call of the wrapped module."""
    with autocast(device, dtype):
        return model(x, targets=y)


class Trainer:
    """Model, optimizer and data of one run; `run()` trains from the current step to the end."""

    def __init__(self, cfg: Config, log=print) -> None:
        self.cfg, self.log = cfg, log
        t = cfg.train
        self.run_dir = Path(t.out_dir)
        self.data_dir = Path(cfg.data.dir)
        meta = DataMeta.read(self.data_dir)
        self.tokenizer = load_tokenizer(self.data_dir)
        if self.tokenizer.sha256 != meta.tokenizer_sha256:
            raise UserError(
                f"{self.data_dir}/tokenizer.json does not match its meta.json; run `sllm prepare` again"
            )
        _resolve_model_config(cfg, meta)
        self.block_size = t.block_size or cfg.model.block_size
        self.cluster, self.device = join_cluster(select_device(t.device), t.dist_timeout_s)
        allow_tf32(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.amp_dtype = select_autocast_dtype(self.device, t.dtype)
        self.train_tokens = open_split(self.data_dir, "train", meta)
        self.mixture = TrainMixture.from_meta(meta)
        val_tokens = open_split(self.data_dir, "val", meta)
        self.val_windows = (
            fixed_windows(val_tokens, self.block_size, t.eval_windows) if len(val_tokens) > 1 else None
        )
        self.batch_size = t.batch_size or t.micro_batch * t.grad_accum * self.cluster.world_size
        self.tokens_per_step = self.batch_size * self.block_size
        self.tokens_per_epoch = t.tokens_per_epoch or len(self.train_tokens)
        _resolve_step_budget(t, self.tokens_per_step, self.tokens_per_epoch)

        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model).to(self.device)
        self.model.checkpoint_blocks = t.activation_checkpointing
        self.micro_batch_loss = chunked_loss if t.chunked_loss else logits_loss
        self.description = f"{describe(self.model)} on {self.device.type}"
        self.ddp_model = wrap_model(self.model, self.cluster, self.device, t.parallel)
        # A sharded model needs every rank in each forward pass, evaluation included.
        self.collective_eval = self.cluster.distributed and t.parallel == "fsdp"
        self.flops_per_token = training_flops_per_token(self.model, cfg.model, self.block_size)
        self.peak_flops = (
            gpu_peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        )
        if t.compile:
            self.ddp_model = torch.compile(self.ddp_model)
        self.optimizers = build_optimizers(self.model, t, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.tokens_seen = 0
        self.best_val_loss = math.inf
        self.finite_losses = torch.ones((), dtype=torch.bool, device=self.device)
        self.last_val_loss: float | None = None
        self.last_val_step: int | None = None
        self.micro_batch: int | None = None if t.micro_batch == "auto" else t.micro_batch
        if self.micro_batch is not None:
            self._split_batch(self.micro_batch)

    # ---- batch split ----------------------------------------------------------------

    def _split_batch(self, micro_batch: int) -> None:
        """Fix the micro-batch, the accumulation that keeps the global batch, and the windows."""
        self.micro_batch = micro_batch
        self.grad_accum = accumulation_steps(self.batch_size, micro_batch, self.cluster.world_size)
        self.windows = TrainWindows(
            self.train_tokens, self.block_size, micro_batch, self.cfg.train.seed, self.mixture
        )

    def settle_micro_batch(self) -> None:
        """`train.micro_batch: auto` becomes a number (unless resume took the recorded one),
        written into the config so config.yaml records it."""
        if self.micro_batch is None:
            self._split_batch(self._search_micro_batch())
            if self.cluster.is_main:
                self.log(
                    f"micro-batch auto: {self.micro_batch} sequences × {self.grad_accum} accumulation × "
                    f"{self.cluster.world_size} processes = {self.batch_size} sequences per step"
                )
        self.cfg.train.micro_batch = self.micro_batch

    def _search_micro_batch(self) -> int:
        """The largest power-of-two micro-batch whose training step fits, the same on every rank.

        The trials move the weights and fill the optimizer state, so both are put back after."""
        sizes = power_of_two_sizes(per_process_batch(self.batch_size, self.cluster.world_size))
        if self.device.type == "cpu":
            sizes = [size for size in sizes if self._estimated_bytes(size) <= available_ram_bytes() // 2]
        initial_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        found = largest_fitting(sizes, survives(self._trial_step))
        self.model.load_state_dict(initial_weights)
        self.model.zero_grad(set_to_none=True)
        self.optimizers = build_optimizers(self.model, self.cfg.train, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        found = min_over_ranks(found, self.cluster, self.device)
        if not found:
            raise no_micro_batch_fits(self.block_size, self.device)
        return found

    def _estimated_bytes(self, micro_batch: int) -> int:
        """Training memory by `training_memory`, whose bf16 activations double in fp32."""
        checkpointing = self.cfg.train.activation_checkpointing
        memory = training_memory(self.model, self.cfg.model, micro_batch, self.block_size, checkpointing)
        return memory.total_bytes + (memory.activations_bytes if self.amp_dtype is None else 0)

    def _trial_step(self, micro_batch: int) -> None:
        """One full training step on random tokens of the real shape, without gradient sync."""
        x = torch.randint(0, self.cfg.model.vocab_size, (micro_batch, self.block_size), device=self.device)
        checkpointing = self.cfg.train.activation_checkpointing
        with gradient_sync(self.ddp_model, False), onednn_linears(self.device, checkpointing):
            loss = self.micro_batch_loss(self.ddp_model, x, x, self.device, self.amp_dtype)
            self.scaler.scale(loss).backward()
        self._apply_gradients()

    # ---- state ----------------------------------------------------------------------

    def _compatible_checkpoint(self, run_dir: Path, purpose: str) -> Checkpoint | None:
        """The newest verified checkpoint of `run_dir`, refused if made for another model."""
        checkpoint = load_latest(run_dir)
        if checkpoint is None:
            return None
        differences = config_differences(checkpoint.meta.get("model_config", {}), asdict(self.cfg.model))
        if differences:
            if purpose == "resume":
                fix = "use the same model settings or a new --out"
            elif any(difference.startswith("vocab_size") for difference in differences):
                fix = f"prepare the data with `--tokenizer {run_dir}` and leave model.vocab_size at 0"
            else:
                fix = "set those model keys to that run's values"
            raise UserError(
                f"{purpose}: checkpoint {checkpoint.path} was made for another model "
                f"({'; '.join(differences)}); {fix}"
            )
        return checkpoint

    def resume(self) -> bool:
        """Load the newest verified checkpoint if there is one; True when something was loaded."""
        checkpoint = self._compatible_checkpoint(self.run_dir, "resume")
        if checkpoint is None:
            return False
        self._refuse_another_optimizer(checkpoint)
        state = checkpoint.train_state()
        try:
            load_full_state(self.model, self.optimizers, checkpoint.model_state(), state["optimizers"])
        except (KeyError, ValueError) as error:  # a checkpoint older than its meta's "optimizer"
            raise UserError(
                f"resume: the optimizer state in {checkpoint.path} does not fit "
                f"train.optimizer={self.cfg.train.optimizer} ({type(error).__name__}: {error}); "
                "resume with the optimizer the run was trained with"
            ) from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.best_val_loss = float(state["best_val_loss"])
        if self.cfg.train.micro_batch == "auto":
            self._split_batch(_recorded_micro_batch(checkpoint))
        if self.cluster.is_main:
            self.log(f"resumed from {checkpoint.path} (step {self.step}, {self.tokens_seen:,} tokens seen)")
            self._note_changed_settings(checkpoint.meta)
        return True

    def _refuse_another_optimizer(self, checkpoint: Checkpoint) -> None:
        """Another optimizer's state cannot continue the run; its weights can start a new one."""
        saved, wanted = checkpoint.meta.get("optimizer"), self.cfg.train.optimizer
        if saved is not None and saved != wanted:
            raise UserError(
                f"resume: {checkpoint.path} was trained with train.optimizer={saved}, not {wanted}; "
                f"resume with train.optimizer={saved}, or start a new --out with "
                f"train.init_from={self.run_dir} to continue its weights with {wanted}"
            )

    def _note_changed_settings(self, meta: dict) -> None:
        """Resuming with another global batch or schedule is allowed, but no longer reproduces
        the uninterrupted run: say so rather than change the training silently."""
        t, saved_tokens = self.cfg.train, meta.get("tokens_per_step")
        if saved_tokens is not None and saved_tokens != self.tokens_per_step:
            self.log(
                f"note: {self.tokens_per_step:,} tokens per step where the run had {saved_tokens:,} "
                "(without train.batch_size the global batch follows micro_batch × grad_accum × "
                "processes); set train.batch_size to keep the run's batch"
            )
        for key in ("max_steps", "schedule"):
            saved = meta.get(key)
            if saved is not None and saved != getattr(t, key):
                self.log(
                    f"note: train.{key} is {getattr(t, key)} where the run had {saved}: the "
                    f"learning-rate schedule follows the new setting from step {self.step}"
                )

    def initialize_from(self, source_run: Path) -> None:
        """Take another run's newest weights (e.g. a base model for domain training)."""
        checkpoint = self._compatible_checkpoint(source_run, "train.init_from")
        if checkpoint is None:
            raise UserError(f"train.init_from: {source_run} has no checkpoint to start from")
        if checkpoint.meta.get("tokenizer_sha256") != self.tokenizer.sha256:
            raise UserError(f"train.init_from: {source_run} used another tokenizer than {self.data_dir}")
        load_full_state(self.model, self.optimizers, checkpoint.model_state(), None)
        if self.cluster.is_main:
            self.log(f"initialized from {checkpoint.path} (a fresh optimizer and schedule)")

    def _state(self) -> tuple[dict, dict, dict]:
        """Weights, training state and meta for a checkpoint (collective under FSDP)."""
        model_state, optimizer_state = full_state(self.model, self.optimizers)
        train_state = {
            "optimizers": optimizer_state,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
        }
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "val_loss": self.last_val_loss,
            "val_step": self.last_val_step,
            "optimizer": self.cfg.train.optimizer,
            "schedule": self.cfg.train.schedule,
            "max_steps": self.cfg.train.max_steps,
            "tokens_per_step": self.tokens_per_step,
            "model_config": asdict(self.cfg.model),
            "tokenizer_sha256": self.tokenizer.sha256,
            "micro_batch": self.micro_batch,
        }
        return model_state, train_state, meta

    def save(self, name: str) -> None:
        """A periodic checkpoint; every rank gathers (FSDP), rank 0 checks that every weight is
        finite (an update can break them before any loss shows it) and writes."""
        state = self._state() if self.collective_eval or self.cluster.is_main else None
        broken = self.cluster.is_main and not all_finite(state[0].values())
        if any_rank(broken, self.cluster, self.device):
            raise self._diverged("its weights are no longer finite numbers")
        if self.cluster.is_main:
            save_checkpoint(self.run_dir, *state, keep_last=self.cfg.train.keep_last, name=name)

    def require_finite_loss(self) -> None:
        """Stops a diverged run before its loss reaches a log, an evaluation or a checkpoint. The
        losses since the last check are collected on the device, so the steps between checks
        do not wait for the host."""
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
        """The checkpoint the step just taken ends with, if any: `epoch-N` when it completed
        epoch N (by tokens seen, so a changed world size keeps the boundaries), `step-N` at the
        interval, or `step-N` anyway when the run ends or stops here."""
        t = self.cfg.train
        if t.checkpoint_every == "epoch":
            epoch = self.tokens_seen // self.tokens_per_epoch
            if epoch > (self.tokens_seen - self.tokens_per_step) // self.tokens_per_epoch:
                return epoch_name(epoch)
        elif self.step % t.checkpoint_interval == 0:
            return step_name(self.step)
        return step_name(self.step) if must_save else None

    # ---- one step -------------------------------------------------------------------

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """On CUDA the batch goes through pinned memory, so the copy runs asynchronously while
        the GPU still works on the previous micro-batch."""
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def train_step(self) -> torch.Tensor:
        """One optimizer update; returns the mean micro-batch loss (a tensor: no host sync)."""
        t = self.cfg.train
        set_learning_rates(self.optimizers, self.step, t)
        total = torch.zeros((), device=self.device)
        for micro_step in range(self.grad_accum):
            index = micro_step * self.cluster.world_size + self.cluster.rank
            torch.manual_seed((t.seed * 1_000_003 + self.step) * 1_009 + index)  # dropout
            x, y = (self._to_device(v) for v in self.windows.batch(self.step, index))
            last_micro_step = micro_step == self.grad_accum - 1
            products = onednn_linears(self.device, t.activation_checkpointing)
            with gradient_sync(self.ddp_model, last_micro_step), products:
                loss = self.micro_batch_loss(self.ddp_model, x, y, self.device, self.amp_dtype)
                self.scaler.scale(loss / self.grad_accum).backward()
            total += loss.detach()
        self._apply_gradients()
        self.finite_losses &= torch.isfinite(total)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return total / self.grad_accum

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

    def evaluate(self, sinks: MetricSinks) -> float | None:
        """Validation loss, best checkpoint and samples: on rank 0 with the unwrapped model, or on
        every rank with a sharded one (sampling is seeded, so all ranks draw the same tokens)."""
        participates = self.cluster.is_main or self.collective_eval
        if self.val_windows is None or not participates:
            return None
        self.model.eval()
        scores = score_windows(
            self.model, *self.val_windows, self.cfg.eval.batch_size, self.device, self.amp_dtype
        )
        self.model.train()
        val_loss = self.last_val_loss = scores.loss
        self.last_val_step = self.step
        metrics = {
            "val_loss": val_loss,
            "val_perplexity": math.exp(val_loss),
            "val_accuracy": scores.accuracy,
            "val_top5_accuracy": scores.top5_accuracy,
            "tokens": self.tokens_seen,
        }
        sinks.log(self.step, metrics)
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            state = self._state()
            if self.cluster.is_main:
                save_best(self.run_dir, *state)
        if self.cfg.log.samples_at_eval and self.cfg.sample.prompts:
            samples = sample_prompts(self.model, self.tokenizer, self.cfg.sample, self.device, self.amp_dtype)
            if self.cluster.is_main:
                path = write_samples(self.run_dir, self.step, samples)
                sinks.text(self.step, "samples", path.read_text(encoding="utf-8"))
        return val_loss

    # ---- the loop -------------------------------------------------------------------

    def _log_progress(self, loss: torch.Tensor, tokens_per_s: float, sinks: MetricSinks, bar: tqdm) -> None:
        """Mean loss over ranks (the one host sync of a logged step), to the sinks and the bar."""
        metrics = {
            "loss": float(mean_over_ranks(loss, self.cluster)),
            "lr": lr_at(self.step - 1, self.cfg.train),
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "epoch": self.tokens_seen / self.tokens_per_epoch,
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
        t = self.cfg.train
        main = self.cluster.is_main
        if main:
            self.log(f"{self.description}, {self.tokens_per_step:,} tokens per step")
            for hint in (
                cpu_bf16_hint(self.device, self.amp_dtype, count_parameters(self.model)),
                optimizer_hint(t),
            ):
                if hint:
                    self.log(hint)
        sinks = MetricSinks(self.run_dir, self.cfg, self.step, enabled=main)
        show_bar = self.cfg.log.progress and main
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not show_bar, dynamic_ncols=True)
        self.model.train()
        stopped_by = None
        window_start, window_steps = time.perf_counter(), 0
        try:
            with StopRequest() as stop:
                while self.step < t.max_steps:
                    loss = self.train_step()
                    window_steps += 1
                    bar.update(1)
                    last = self.step == t.max_steps
                    logs = self.step % t.log_interval == 0 or last
                    evaluates = (t.eval_interval and self.step % t.eval_interval == 0) or last
                    checked = logs or evaluates
                    if checked:
                        self.require_finite_loss()
                    if logs:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        self._log_progress(loss, window_steps * self.tokens_per_step / elapsed, sinks, bar)
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
            if main and self.step == t.max_steps:
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


def _recorded_micro_batch(checkpoint: Checkpoint) -> int:
    """The micro-batch a checkpoint was trained with: resuming with another reads other windows."""
    if "micro_batch" not in checkpoint.meta:
        raise UserError(
            f"{checkpoint.path} does not record its micro-batch; set train.micro_batch to the one it used"
        )
    return int(checkpoint.meta["micro_batch"])


def train(cfg: Config, log=print) -> TrainResult:
    """Train (or resume, or confirm finished) the run described by `cfg`, in this process or
    as one rank of a `torchrun` job."""
    trainer = Trainer(cfg, log)
    try:
        result = _train(trainer, cfg, log)
        barrier(trainer.cluster)  # every rank is done before any tears the process group down
        return result
    finally:
        # DDP's reducer holds the process group; freed after its peer has exited, the gloo
        # group's destructor waits forever, so it goes first, while every rank is alive.
        trainer.ddp_model = None
        gc.collect()
        leave_cluster(trainer.cluster)


def _train(trainer: Trainer, cfg: Config, log) -> TrainResult:
    run_dir, main = trainer.run_dir, trainer.cluster.is_main
    check_sinks_available(cfg)
    if cfg.train.resume == "never" and load_latest(run_dir) is not None:
        raise UserError(f"{run_dir} already has checkpoints; use a new --out or train.resume=auto")
    if main:
        ensure_writable_dir(run_dir, "run directory")
        clean_leftovers(run_dir)
        _prepare_run_dir(run_dir, trainer.data_dir)
    barrier(trainer.cluster)
    resumed = cfg.train.resume == "auto" and trainer.resume()
    if not resumed and cfg.train.init_from:
        trainer.initialize_from(Path(cfg.train.init_from))
    trainer.settle_micro_batch()
    if main:
        save_config(cfg, run_dir / CONFIG_FILE)
    if resumed and trainer.step >= cfg.train.max_steps:
        if main:
            log(f"{run_dir} already finished: step {trainer.step} of {cfg.train.max_steps}")
        return TrainResult(run_dir, trainer.step, trainer.tokens_seen, None, already_finished=True)
    return trainer.run()
