"""Loss, perplexity and bits per byte of a model over a whole split or any text file.

Strided windows score every token after the first exactly once, so results are exact for the
split; a text file is scored as one document after an EOS, as in the prepared data. Bits per
byte per script: the scored tokens are cut into documents after each EOS, each decoded and
classified by `script_group` (ko, en, else other) with its UTF-8 bytes, so the groups'
losses and bytes add up to the totals, for the cost of one decode.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sllm.data.loader import EvalBatch, eval_batches
from sllm.data.meta import META_FILE, DataMeta
from sllm.data.sources import read_text_file
from sllm.data.verify import open_split
from sllm.errors import UserError
from sllm.progress import progress_bar
from sllm.run import LoadedRun, open_run
from sllm.runtime import Dtype, autocast, select_autocast_dtype, select_device
from sllm.text import SCRIPT_GROUPS, script_group
from sllm.tokenizer import Tokenizer, nfc


@dataclass
class TokenScores:
    """Sums over scored tokens: nll (nats), top-1/top-5 hits and, with `labels`, nll per script."""

    nll: float = 0.0
    tokens: int = 0
    top1: int = 0
    top5: int = 0
    labels: torch.Tensor | None = None
    script_nll: list[float] = field(default_factory=lambda: [0.0] * len(SCRIPT_GROUPS))

    def add(self, logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor | None = None) -> None:
        logits, targets = logits.float().flatten(0, 1), targets.flatten()
        if scored is not None:
            logits, targets = logits[scored.flatten()], targets[scored.flatten()]
        losses = F.cross_entropy(logits, targets, reduction="none")
        self.nll += float(losses.sum())
        if self.labels is not None:
            labels = self.labels[self.tokens : self.tokens + len(targets)].to(losses.device, torch.long)
            by_group = torch.zeros(len(SCRIPT_GROUPS), device=losses.device).index_add_(0, labels, losses)
            self.script_nll = [a + b for a, b in zip(self.script_nll, by_group.tolist(), strict=True)]
        ranked = logits.topk(min(5, logits.size(-1)), dim=-1).indices
        hits = ranked == targets[:, None]
        self.top1 += int(hits[:, 0].sum())
        self.top5 += int(hits.any(dim=-1).sum())
        self.tokens += len(targets)

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def accuracy(self) -> float:
        return self.top1 / self.tokens

    @property
    def top5_accuracy(self) -> float:
        return self.top5 / self.tokens

    def script_bits_per_byte(self, script_bytes: np.ndarray) -> dict[str, float]:
        """Bits per byte of each script group with text."""
        pairs = zip(SCRIPT_GROUPS, self.script_nll, script_bytes.tolist(), strict=True)
        return {group: nll / math.log(2) / size for group, nll, size in pairs if size}


def script_labels(tokens: np.ndarray, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Each token's script group (index into SCRIPT_GROUPS) and each group's UTF-8 bytes; an EOS alone
    (the end of a document begun before a window) goes with the next document."""
    tokens = np.asarray(tokens)
    labels, script_bytes = np.zeros(len(tokens), dtype=np.int8), np.zeros(len(SCRIPT_GROUPS), dtype=np.int64)
    ends = np.flatnonzero(tokens == tokenizer.eos_id) + 1
    first = 0  # of the tokens not yet given a group
    for begin, end in itertools.pairwise(sorted({0, *ends.tolist(), len(tokens)})):
        text = tokenizer.decode(
            tokens[begin : end - 1 if tokens[end - 1] == tokenizer.eos_id else end].tolist()
        )
        if not text and end < len(tokens):
            continue
        group = SCRIPT_GROUPS.index(script_group(text))
        labels[first:end], first = group, end
        script_bytes[group] += len(text.encode("utf-8"))
    return labels, script_bytes


@dataclass
class EvalResult:
    split: str  # the split's name, or the text file's path
    scores: TokenScores
    bytes: int
    script_bytes: np.ndarray  # UTF-8 bytes per SCRIPT_GROUPS entry

    @property
    def tokens(self) -> int:
        return self.scores.tokens

    @property
    def loss(self) -> float:
        return self.scores.loss

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.scores.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "split": self.split,
            "tokens": self.tokens,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "accuracy": self.scores.accuracy,
            "top5_accuracy": self.scores.top5_accuracy,
            **{
                f"bits_per_byte_{g}": v
                for g, v in self.scores.script_bits_per_byte(self.script_bytes).items()
            },
        }


@torch.no_grad()
def score_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    device: torch.device,
    amp_dtype: Dtype = None,
    labels: np.ndarray | None = None,
) -> TokenScores:
    """Sums over (inputs, targets[, scored]) batches; `labels`: each counted target's script group."""
    scores = TokenScores(labels=None if labels is None else torch.from_numpy(labels))
    for inputs, targets, *scored in batches:
        with autocast(device, amp_dtype):
            logits = model(inputs.to(device))
        scores.add(logits, targets.to(device), *(mask.to(device) for mask in scored))
    return scores


def score_tokens(
    model: nn.Module,
    tokens: np.ndarray,
    stride: int,
    batch_size: int,
    device: torch.device,
    amp_dtype: Dtype = None,
    labels: np.ndarray | None = None,
    label: str = "eval",
) -> TokenScores:
    """Scores of every token after the first, each predicted once; `labels`: each token's script."""
    with progress_bar(desc=label, total=len(tokens) - 1, unit=" tokens", unit_scale=True) as bar:
        batches = _counted(eval_batches(tokens, model.block_size, stride, batch_size), bar)
        return score_batches(model, batches, device, amp_dtype, None if labels is None else labels[1:])


def _counted(batches: Iterator[EvalBatch], bar: tqdm) -> Iterator[EvalBatch]:
    """`batches`, each one's scored tokens added to `bar` once it has been scored."""
    for batch in batches:
        yield batch
        bar.update(int(batch.scored.sum()))


class Evaluator:
    """A run opened once for scoring prepared splits (its own data or `data_dir`) or text."""

    def __init__(self, run: LoadedRun, device: torch.device, data_dir: str | Path | None = None) -> None:
        self.run = run
        self.device = device
        self.amp_dtype = select_autocast_dtype(device)
        self.data_dir = Path(data_dir) if data_dir else None  # None: the run's data.dir

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        device: str = "auto",
        checkpoint: str = "latest",
        data_dir: str | Path | None = None,
    ) -> Evaluator:
        chosen = select_device(device)
        return cls(open_run(run_dir, chosen, checkpoint), chosen, data_dir)

    def _score(
        self, tokens: np.ndarray, stride: int, batch_size: int, label: str
    ) -> tuple[TokenScores, np.ndarray]:
        """The scores and each script group's bytes."""
        block_size = self.run.model.block_size
        stride = stride or self.run.config.eval.stride or max(1, block_size // 2)
        if not 1 <= stride <= block_size:
            raise UserError(f"--stride must be between 1 and the context ({block_size})")
        batch = batch_size or self.run.config.eval.batch_size
        labels, script_bytes = script_labels(tokens, self.run.tokenizer)
        scores = score_tokens(
            self.run.model, tokens, stride, batch, self.device, self.amp_dtype, labels, f"eval {label}"
        )
        return scores, script_bytes

    def prepared_dir(self) -> Path:
        """The data given, else the run's data.dir (relative to where the run was trained)."""
        if self.data_dir:
            return self.data_dir
        data_dir = Path(self.run.config.data.dir)
        if data_dir.is_absolute() or (data_dir / META_FILE).is_file():
            return data_dir
        raise UserError(
            f"the run's data.dir {data_dir} (relative to the current directory {Path.cwd()}) is not a "
            "prepared data directory; run from the directory the run was trained in, or pass --data DIR"
        )

    def data_meta(self) -> DataMeta:
        """The prepared data's description, refused if made with another tokenizer."""
        data_dir = self.prepared_dir()
        meta = DataMeta.read(data_dir)
        if meta.tokenizer_sha256 != self.run.tokenizer.sha256:
            raise UserError(
                f"the data in {data_dir} was prepared with another tokenizer than {self.run.path}; "
                f"score data prepared with its tokenizer (`sllm prepare --tokenizer {self.run.path}`)"
            )
        meta.check_tokenizer(data_dir, self.run.tokenizer.sha256, self.run.tokenizer.vocab_size)
        return meta

    def evaluate(self, split: str = "val", stride: int = 0, batch_size: int = 0) -> EvalResult:
        """Loss, perplexity, bits per byte and accuracy over a whole split of the prepared data."""
        meta = self.data_meta()
        sizes = meta.splits
        if split not in sizes or sizes[split].tokens < 2:
            present = [name for name, size in sizes.items() if size.tokens >= 2]
            raise UserError(f"split {split!r} has no tokens to score; the data has {', '.join(present)}")
        tokens = open_split(self.prepared_dir(), split, meta)
        scores, script_bytes = self._score(tokens, stride, batch_size, split)
        return EvalResult(split, scores, sizes[split].bytes, script_bytes)

    def evaluate_text(self, text: str, name: str, stride: int = 0, batch_size: int = 0) -> EvalResult:
        """The same numbers for any text, scored as one document that follows an EOS."""
        tokenizer = self.run.tokenizer
        tokens = np.asarray([tokenizer.eos_id, *tokenizer.encode(text)], dtype=np.int64)
        scores, script_bytes = self._score(tokens, stride, batch_size, name)
        return EvalResult(name, scores, len(text.encode("utf-8")), script_bytes)


def evaluate_run(
    run_dir: str | Path,
    splits: list[str] | None = None,
    stride: int = 0,
    batch_size: int = 0,
    device: str = "auto",
    checkpoint: str = "latest",
    data_dir: str | Path | None = None,
) -> list[EvalResult]:
    """Score the splits (default: `eval.splits` that have tokens) of `data_dir` or the run's data."""
    evaluator = Evaluator.from_run(run_dir, device, checkpoint, data_dir)
    sizes = evaluator.data_meta().splits
    wanted = splits or [s for s in evaluator.run.config.eval.splits if s in sizes and sizes[s].tokens >= 2]
    if not wanted:
        raise UserError(f"none of the splits {evaluator.run.config.eval.splits} has tokens to score")
    return [evaluator.evaluate(split, stride, batch_size) for split in wanted]


def evaluate_texts(
    run_dir: str | Path,
    files: list[str | Path],
    stride: int = 0,
    batch_size: int = 0,
    device: str = "auto",
    checkpoint: str = "latest",
) -> list[EvalResult]:
    """Score each UTF-8 text file, tokenized with the run's tokenizer, as one document."""
    texts = {str(path): read_eval_text(Path(path)) for path in files}
    evaluator = Evaluator.from_run(run_dir, device, checkpoint)
    return [evaluator.evaluate_text(text, name, stride, batch_size) for name, text in texts.items()]


def read_eval_text(path: Path) -> str:
    """The file's text, NFC-normalized; a missing, empty or non-UTF-8 file is a user error."""
    text = nfc(read_text_file(path, "text file", "an existing UTF-8 file to --text"))
    if not text:
        raise UserError(f"{path} is empty; give a file with text to score")
    return text


def unigram_perplexity(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity of add-one smoothed train token frequencies: the bar beyond word counts."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(np.exp(-log_probs[np.asarray(eval_tokens[1:], dtype=np.int64)].mean()))
