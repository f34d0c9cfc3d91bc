"""The LoRA visual-instruction-tuning recipe: ``setup`` → ``train`` → ``save_checkpoint`` / ``save_final``.

    edge-vit finetune train --model DIR --data DIR/instruct.json --out DIR --stage 1|2 [flags]
    edge-vit finetune train --config finetune/recipes/smolvlm_256m_stage2.yaml --model ... [flags override YAML]
    torchrun --nproc_per_node 2 -m edge_vit finetune train ...      (or accelerate launch; gloo on CPU)

Stage 1 trains the connector (alignment); stage 2 trains LoRA on the text
model, optionally with the connector and whole modules (``modules_to_save``,
e.g. ``lm_head``). Both write one PEFT adapter (``save_pretrained``) with a
model card. To run stage 2 on top of stage 1, merge stage 1 first
(``edge-vit finetune merge``) and train stage 2 on the merged folder; the
merged folder's ``training_history.json`` carries the earlier stages into the
next model card.

The loss is the cross-entropy of the answer tokens only (every assistant turn
and its stop token; see ``finetune.collate``), normalized by the number of
answer tokens of the whole optimizer step (all micro-batches of the gradient
accumulation, all ranks), so accumulation and data parallelism give the same
gradient as one big batch.

Data order is a pure function of (seed, epoch, rank, world size): step ``s``
uses micro-batches ``s*grad_accum ... (s+1)*grad_accum - 1`` of an endless
stream of seeded epochs. A checkpoint therefore needs only the step, the
adapter, the optimizer and scheduler states and every rank's torch RNG state
(dropout); ``--resume`` continues to the same result as an uninterrupted run.

Distributed: plain ``torch.distributed`` DDP (no Accelerate state), set up from
the environment that ``torchrun`` and ``accelerate launch`` both provide
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); gloo on CPU, NCCL on GPU.
Rank 0 alone writes files. Each rank prints one line when it finishes.

Outputs in ``--out``: ``adapter_config.json`` + ``adapter_model.safetensors``
(PEFT), ``README.md`` (model card), ``loss.jsonl``, ``loss.png``,
``train_summary.json``, and ``checkpoints/step-NNNNNN/`` when ``--save-every``
is set. The summary JSON is also the last line on stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from edge_vit.errors import EdgeVitError
from finetune.collate import IGNORE_INDEX, InstructDataset, collate, load_samples
from finetune.lora import LORA_MODULES, arch_spec, check_module_names, check_trainable, count_parameters, lora_config

__all__ = ["TrainConfig", "load_recipe", "LoRARecipe", "run_training", "micro_batches", "lr_factor",
           "HISTORY_FILE", "SUMMARY_FILE"]

log = logging.getLogger(__name__)

HISTORY_FILE = "training_history.json"  # written by merge: the stages a merged model has been through
SUMMARY_FILE = "train_summary.json"
CHECKPOINTS = "checkpoints"
_STATE_FILE = "trainer_state.json"
# Fields that change what the adapter is; a resumed run must agree with its checkpoint on them.
_STRUCTURAL = ("stage", "lora_r", "lora_alpha", "lora_modules", "train_connector", "modules_to_save", "seed",
               "batch_size", "grad_accum", "tiling")


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; YAML recipes and CLI flags fill it (flags win)."""

    model: str
    data: str
    out: str
    stage: int = 2
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_modules: tuple[str, ...] = LORA_MODULES
    train_connector: bool = False  # stage 2: train the connector too (stage 1 always does)
    modules_to_save: tuple[str, ...] = ()  # whole modules trained and saved with the adapter, e.g. lm_head
    save_every: int = 0  # checkpoint every N optimizer steps (0: none)
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    tiling: str = "single"
    max_length: int | None = None  # default: the model's context
    precision: str = "fp32"  # fp32 | bf16 (autocast; master weights stay fp32)
    device: str = "auto"  # auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)
    image_root: str | None = None
    workers: int = 0  # DataLoader worker processes
    log_every: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        from edge_vit.vlm import TilingPolicy

        for name in ("lora_modules", "modules_to_save"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple([value] if isinstance(value, str) else (value or ())))
        checks = [
            (self.stage in (1, 2), f"stage must be 1 or 2, got {self.stage}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.lora_r >= 1 and self.lora_alpha > 0, "lora_r must be >= 1 and lora_alpha > 0"),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.save_every >= 0 and self.keep_checkpoints >= 1, "save_every must be >= 0, keep_checkpoints >= 1"),
            (self.max_length is None or self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}"),
            (self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {self.precision}"),
            (self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
             f"device must be auto, cpu or cuda[:N], got {self.device}"),
            (self.workers >= 0 and self.log_every >= 1, "workers must be >= 0 and log_every >= 1"),
            (self.max_grad_norm >= 0 and self.weight_decay >= 0, "max_grad_norm and weight_decay must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise EdgeVitError(f"train: {message}")
        try:
            TilingPolicy(self.tiling)
        except ValueError:
            raise EdgeVitError(f"train: tiling must be single or split, got {self.tiling}") from None

    @classmethod
    def from_sources(cls, recipe: str | Path | None = None, **overrides: Any) -> "TrainConfig":
        """Defaults < the YAML recipe < ``overrides`` (None values are ignored: 'flag not given')."""
        values = load_recipe(recipe) if recipe else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        missing = [k for k in ("model", "data", "out") if not values.get(k)]
        if missing:
            raise EdgeVitError(f"train: missing {', '.join('--' + k for k in missing)} (flag or recipe key)")
        return cls(**values)

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def load_recipe(path: str | Path) -> dict:
    """A YAML recipe: a flat mapping of TrainConfig field names; unknown keys are an error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EdgeVitError(f"recipe not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise EdgeVitError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(values, dict):
        raise EdgeVitError(f"{path}: a recipe is a mapping of training options")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise EdgeVitError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return values


# ---------------------------------------------------------------- pure pieces: data order, schedule


def micro_batches(n: int, *, seed: int, rank: int, world: int, batch_size: int, start: int = 0) -> Iterator[list[int]]:
    """Endless micro-batches (sample indices) of one rank, from micro-batch number ``start`` on.

    Epoch ``e`` is a permutation seeded by (seed, e), padded by wrapping so that
    every rank gets the same number of full micro-batches, dealt round-robin to
    the ranks. Micro-batch ``m`` is the same whether the run got there directly
    or resumed.
    """
    import torch

    per_epoch = math.ceil(n / (world * batch_size))
    epoch, offset = divmod(start, per_epoch)
    while True:
        g = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{epoch}".encode()).hexdigest()[:15], 16))
        order = torch.randperm(n, generator=g).tolist()
        total = per_epoch * world * batch_size
        order = (order * math.ceil(total / n))[:total]
        mine = order[rank::world]
        for m in range(offset, per_epoch):
            yield mine[m * batch_size:(m + 1) * batch_size]
        epoch, offset = epoch + 1, 0


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 (the first step already moves), then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- distributed environment


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> DistEnv:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EdgeVitError("train: --device cuda, but torch sees no CUDA GPU")
        device = f"cuda:{local_rank}" if world > 1 or device == "cuda" else device
        torch.cuda.set_device(torch.device(device))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=device)


def _all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    import torch

    if env.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def _gather(obj: Any, env: DistEnv) -> list:
    if env.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def _barrier(env: DistEnv) -> None:
    if env.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------- the loss


def _answer_loss_module():
    import torch
    import torch.nn.functional as F

    class AnswerLoss(torch.nn.Module):
        """(summed cross-entropy over answer tokens, their count): lm_head runs only where a label is.

        It wraps the PEFT model so that DDP sees one forward per micro-batch.
        """

        def __init__(self, model: Any) -> None:  # a PeftModel, or a plain transformers model
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, labels, **images):
            m = self.model
            hf = m.get_base_model() if hasattr(m, "get_base_model") else m  # PEFT: the HF model with LoRA injected
            hidden = hf.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              **images).last_hidden_state  # [B, T, D]
            target = labels[:, 1:]  # [B, T-1]: token t+1 is predicted at t
            keep = target != IGNORE_INDEX
            logits = hf.lm_head(hidden[:, :-1][keep])  # [N, V]
            return F.cross_entropy(logits.float(), target[keep], reduction="sum"), keep.sum()

    return AnswerLoss


# ---------------------------------------------------------------- the recipe


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _peak_memory(device: str) -> dict:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    out = {"peak_rss_mb": round(rss / 2**20, 1)}
    if device.startswith("cuda"):
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)
    return out


@dataclass
class _State:
    step: int = 0
    history: list[dict] = field(default_factory=list)


class LoRARecipe:
    """One training run: ``setup()`` loads and checks everything, ``train()`` runs, ``save_final()`` writes."""

    def __init__(self, config: TrainConfig) -> None:
        self.cfg = config
        self.out = Path(config.out)
        self.env = DistEnv()
        self.state = _State()
        self.files_written = 0  # during training (loss log, checkpoint files), by this process; only rank 0 writes

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        import torch

        from edge_vit.vlm import TilingPolicy
        from edge_vit.vlm.torch_backend import TorchVLM, check_model_folder

        cfg = self.cfg
        # Cheap checks first: a missing data file or a folder that is not a model fail before anything loads.
        samples, image_root, manifest = load_samples(cfg.data, cfg.image_root)
        check_model_folder(cfg.model)
        self._check_out()
        self.env = env = _init_distributed(cfg.device)
        vlm = TorchVLM.load(cfg.model, device=env.device, dtype="float32", tiling=TilingPolicy(cfg.tiling))
        self.processor, self.stop_ids = vlm.processor, vlm.stop_ids
        self.base_name, self.max_context = vlm.name, vlm.max_context
        model = vlm.model
        self.spec = arch_spec(model)
        check_module_names(model, cfg.modules_to_save)

        from peft import get_peft_model

        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank (DDP also broadcasts rank 0's)
        peft_config = lora_config(self.spec, cfg.stage, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                  modules=cfg.lora_modules, train_connector=cfg.train_connector,
                                  modules_to_save=cfg.modules_to_save)
        try:
            self.model = get_peft_model(model, peft_config)
        except ValueError as exc:  # e.g. a modules_to_save name that matches nothing
            raise EdgeVitError(f"train: cannot set up the adapter: {str(exc).splitlines()[0]}") from None
        self.model.train()
        self.parts = check_trainable(self.model, self.spec, cfg.stage)
        self.trainable, self.total_params = count_parameters(self.model)

        max_length = min(cfg.max_length or self.max_context, self.max_context)
        self.dataset = InstructDataset(samples, image_root, self.processor, self.stop_ids, max_length)
        self.pad_id = self.processor.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.processor.tokenizer.eos_token_id
        self.manifest = manifest
        self.data_sha256 = _sha256(Path(cfg.data))
        self.micro_per_epoch = math.ceil(len(samples) / (env.world * cfg.batch_size))
        self.total_steps = cfg.max_steps or math.ceil(cfg.epochs * self.micro_per_epoch / cfg.grad_accum)
        self.warmup = math.ceil(cfg.warmup_ratio * self.total_steps)

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, warmup=self.warmup, total=self.total_steps, min_ratio=cfg.min_lr_ratio))
        if cfg.resume:
            self.load_checkpoint(self._latest_checkpoint())

        self.loss_module = _answer_loss_module()(self.model)
        self.forward = self.loss_module
        if env.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device_ids = [torch.device(env.device).index] if env.device.startswith("cuda") else None
            self.forward = DDP(self.loss_module, device_ids=device_ids)
        self.history_before = self._previous_stages()

    def _check_out(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise EdgeVitError(f"--out {out} exists and is not a folder")
        has_run = out.is_dir() and ((out / "adapter_config.json").exists() or (out / CHECKPOINTS).exists())
        if has_run and not self.cfg.resume:
            raise EdgeVitError(f"{out} already holds a training run; pass --resume to continue it, or another --out")
        if self.cfg.resume and not (out / CHECKPOINTS).is_dir():
            raise EdgeVitError(f"--resume: no checkpoints in {out / CHECKPOINTS} (train with --save-every N)")

    def _previous_stages(self) -> list[dict]:
        path = Path(self.cfg.model) / HISTORY_FILE
        if path.is_file():
            try:
                return list(json.loads(path.read_text(encoding="utf-8")).get("stages", []))
            except (ValueError, AttributeError):
                log.warning("%s is not valid JSON; earlier stages are not listed in the model card", path)
        return []

    # ------------------------------------------------------------ train

    def train(self) -> dict:
        import torch
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        cfg, env = self.cfg, self.env
        start = self.state.step
        sampler = micro_batches(len(self.dataset), seed=cfg.seed, rank=env.rank, world=env.world,
                                batch_size=cfg.batch_size, start=start * cfg.grad_accum)
        n_micro = (self.total_steps - start) * cfg.grad_accum
        # Its own generator: a DataLoader iterator otherwise draws from the global RNG (dropout's) when created,
        # at step 0 in a straight run but at the resume step in a resumed one.
        loader = DataLoader(self.dataset, batch_sampler=_Take(sampler, n_micro),
                            collate_fn=partial(collate, pad_id=self.pad_id), num_workers=cfg.workers,
                            generator=torch.Generator().manual_seed(cfg.seed + start))
        batches = iter(loader)
        autocast = partial(torch.autocast, device_type=torch.device(env.device).type, dtype=torch.bfloat16,
                           enabled=cfg.precision == "bf16")
        bar = tqdm(total=self.total_steps, initial=start, desc=f"stage {cfg.stage}", unit="step", dynamic_ncols=True,
                   mininterval=0.5, disable=not (env.main and cfg.progress), file=sys.stderr)
        log_file = open(self.out / "loss.jsonl", "a" if cfg.resume else "w", encoding="utf-8") if env.main else None
        self.files_written += log_file is not None
        self._rank_stats = {"samples": 0, "image_tokens": 0, "answer_tokens": 0}
        t_begin = time.perf_counter()
        t_first = None
        steps_run = 0
        try:
            for step in range(start, self.total_steps):
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
                n_tokens = max(1.0, _all_reduce_sum([float(local_tokens)], env)[0])
                loss_sum = 0.0
                for i, batch in enumerate(micro):
                    self._rank_stats["samples"] += int(batch["input_ids"].shape[0])
                    self._rank_stats["image_tokens"] += int(batch.pop("image_tokens").sum())
                    batch = {k: v.to(env.device) for k, v in batch.items()}
                    sync = env.world == 1 or i == len(micro) - 1
                    with (contextlib.nullcontext() if sync else self.forward.no_sync()), autocast():
                        loss, _ = self.forward(**batch)
                    (loss * (env.world / n_tokens)).backward()
                    loss_sum += float(loss.detach())
                self._rank_stats["answer_tokens"] += local_tokens
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf")))
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                total_loss, samples = _all_reduce_sum(
                    [loss_sum, float(sum(int(b["input_ids"].shape[0]) for b in micro))], env)
                record = {"step": step + 1, "loss": total_loss / n_tokens, "lr": lr, "grad_norm": grad_norm,
                          "answer_tokens": int(n_tokens), "samples": int(samples),
                          "epoch": round((step + 1) * cfg.grad_accum / self.micro_per_epoch, 4),
                          "elapsed_s": round(time.perf_counter() - t_begin, 3)}
                self.state.step = step + 1
                self.state.history.append(record)
                steps_run += 1
                if t_first is None:
                    t_first = time.perf_counter()
                if log_file is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps):
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                if cfg.save_every and (step + 1) % cfg.save_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        t_end = time.perf_counter()
        timed = steps_run - 1 if steps_run > 1 else steps_run
        span = (t_end - t_first) if steps_run > 1 else (t_end - t_begin)
        return {"steps_run": steps_run, "seconds": round(t_end - t_begin, 3),
                "steps_per_s": round(timed / span, 3) if span > 0 and timed else None}

    # ------------------------------------------------------------ checkpoints

    def _checkpoint_dir(self, step: int) -> Path:
        return self.out / CHECKPOINTS / f"step-{step:06d}"

    def _latest_checkpoint(self) -> Path:
        found = sorted(p for p in (self.out / CHECKPOINTS).glob("step-*") if (p / _STATE_FILE).is_file())
        if not found:
            raise EdgeVitError(f"--resume: no complete checkpoint in {self.out / CHECKPOINTS}")
        return found[-1]

    def save_checkpoint(self) -> Path:
        """Adapter (safetensors), optimizer, scheduler, every rank's RNG state, step and loss history; rank 0 writes."""
        import torch

        env = self.env
        rng = _gather({"torch": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state(torch.device(env.device))
                       if env.device.startswith("cuda") else None}, env)
        path = self._checkpoint_dir(self.state.step)
        if env.main:
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.model.save_pretrained(tmp, safe_serialization=True)
            (tmp / "README.md").unlink(missing_ok=True)  # peft's empty card template; checkpoints need none
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"torch": [r["torch"] for r in rng], "cuda": [r["cuda"] for r in rng]}, tmp / "rng.pt")
            _write_json(tmp / _STATE_FILE, {"step": self.state.step, "total_steps": self.total_steps,
                                            "world_size": env.world, "written_by_rank": env.rank,
                                            "data_sha256": self.data_sha256,
                                            "config": self.cfg.to_json(), "history": self.state.history})
            self.files_written += sum(1 for _ in tmp.iterdir())
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            kept = sorted(p for p in (self.out / CHECKPOINTS).glob("step-*") if not p.name.endswith(".tmp"))
            for old in kept[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(env)
        return path

    def load_checkpoint(self, path: Path) -> None:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        env = self.env
        state = json.loads((path / _STATE_FILE).read_text(encoding="utf-8"))
        saved = state.get("config", {})
        differ = [k for k in _STRUCTURAL if k in saved and saved[k] != self.cfg.to_json()[k]]
        if differ:
            raise EdgeVitError(f"--resume: {path} was trained with other {', '.join(differ)} "
                               f"({', '.join(f'{k}={saved[k]!r}' for k in differ)})")
        if state.get("data_sha256") != self.data_sha256:
            log.warning("--resume: the data file changed since %s was written", path)
        if int(state.get("world_size", env.world)) != env.world:
            log.warning("--resume: %s ran on %s processes, now %s: the data order differs from an uninterrupted run",
                        path, state.get("world_size"), env.world)
        weights = load_file(str(path / "adapter_model.safetensors"), device=env.device)
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise EdgeVitError(f"--resume: {path} holds weights this adapter does not have")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=env.device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        if env.rank < len(rng["torch"]):
            torch.set_rng_state(rng["torch"][env.rank])
            if rng["cuda"][env.rank] is not None and env.device.startswith("cuda"):
                torch.cuda.set_rng_state(rng["cuda"][env.rank], torch.device(env.device))
        self.state = _State(step=int(state["step"]), history=list(state.get("history", [])))
        if env.main:  # the loss log restarts from the checkpoint: steps after it are redone
            with open(self.out / "loss.jsonl", "w", encoding="utf-8") as f:
                for record in self.state.history:
                    if record["step"] % self.cfg.log_every == 0:
                        f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------ final outputs

    def save_final(self, timing: dict) -> dict:
        """Gather per-rank numbers; rank 0 writes the adapter, card, loss plot and summary. Returns the summary."""
        env, cfg = self.env, self.cfg
        ranks = _gather({"rank": env.rank, **self._rank_stats, "files_written": self.files_written,
                         **_peak_memory(env.device)}, env)
        samples = sum(r["samples"] for r in ranks)
        history = self.state.history
        tail = [r["loss"] for r in history[-max(1, min(10, len(history) // 5)):]]
        stage_record = {
            "stage": cfg.stage, "base_model": self.base_name, "data": str(Path(cfg.data).absolute()),
            "data_sha256": self.data_sha256, "steps": self.state.step,
            "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
        }
        summary = {
            "type": "train_summary",
            "out": str(self.out.absolute()),
            "model": self.base_name,
            "model_type": self.spec.model_type,
            "stage": cfg.stage,
            "steps": self.state.step,
            "total_steps": self.total_steps,
            "world_size": env.world,
            "device": env.device,
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": stage_record["final_loss"],
            "last_loss": history[-1]["loss"] if history else None,
            "trainable_params": self.trainable,
            "total_params": self.total_params,
            "trainable_by_part": self.parts,
            "visual_tokens_per_sample": round(sum(r["image_tokens"] for r in ranks) / samples, 2) if samples else None,
            "answer_tokens": sum(r["answer_tokens"] for r in ranks),
            "samples_seen": samples,
            "steps_per_s": timing.get("steps_per_s"),
            "samples_per_s": round(timing["steps_per_s"] * cfg.batch_size * cfg.grad_accum * env.world, 3)
            if timing.get("steps_per_s") else None,
            "seconds": timing.get("seconds"),
            "peak_memory": {k: max(r[k] for r in ranks) for k in ranks[0] if k.startswith("peak_")},
            "ranks": ranks,
            "data": {"file": str(Path(cfg.data).absolute()), "sha256": self.data_sha256,
                     "samples": len(self.dataset), "manifest_hash": _manifest_hash(self.manifest)},
            "stages": [*self.history_before, stage_record],
            "config": cfg.to_json(),
        }
        if env.main:
            self.model.save_pretrained(self.out, safe_serialization=True)
            (self.out / "README.md").write_text(model_card(summary), encoding="utf-8")
            _write_json(self.out / SUMMARY_FILE, summary)
            plot_losses(history, self.out / "loss.png", title=f"{Path(self.base_name).name} stage {cfg.stage}")
        _barrier(env)
        return summary

    def cleanup(self, finished: bool) -> None:
        """Leave the process group: the DDP wrapper first (its reducer holds gloo work objects that must not
        outlive the group, or the interpreter aborts at exit), then a barrier on success (never after a failure:
        the other ranks may be stuck in a collective), then ``destroy_process_group``."""
        if self.env.world > 1:
            import gc

            import torch.distributed as dist

            self.forward = None
            gc.collect()
            if dist.is_initialized():
                if finished:
                    dist.barrier()
                dist.destroy_process_group()


class _Take:
    """The first ``n`` items of an endless batch sampler (a DataLoader needs a finite one)."""

    def __init__(self, it: Iterator[list[int]], n: int) -> None:
        self.it, self.n = it, n

    def __iter__(self):
        for _ in range(self.n):
            yield next(self.it)

    def __len__(self) -> int:
        return self.n


def _manifest_hash(manifest: dict | None) -> str | None:
    if not manifest:
        return None
    return (manifest.get("dataset") or {}).get("hash")


# ---------------------------------------------------------------- reports


def plot_losses(history: list[dict], path: Path, title: str = "") -> None:
    """Loss per optimizer step (and its moving average) with the learning rate, as a PNG; no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in history]
    losses = [r["loss"] for r in history]
    ax.plot(steps, losses, lw=1, alpha=0.5, label="loss")
    if len(losses) >= 5:
        k = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in history], color="grey", lw=1, ls="--", label="lr")
    ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)


def model_card(summary: dict) -> str:
    """The adapter's README.md: base model, data, stages, steps, hyper-parameters, final loss, cost."""
    cfg = summary["config"]
    stages = "\n".join(
        f"| {s.get('stage')} | `{s.get('base_model')}` | `{Path(str(s.get('data'))).name}` "
        f"`{str(s.get('data_sha256'))[:12]}` | {s.get('steps')} | {s.get('final_loss')} |"
        for s in summary["stages"])
    hyper = "\n".join(f"| {k} | `{v}` |" for k, v in cfg.items() if k not in ("model", "data", "out"))
    mem = ", ".join(f"{k} {v} MB" for k, v in summary["peak_memory"].items())
    what = ("the connector (vision-language alignment)" if summary["stage"] == 1
            else "LoRA on the text model" + (" + the connector" if cfg["train_connector"] else ""))
    if cfg["modules_to_save"]:
        what += " + " + ", ".join(cfg["modules_to_save"])
    return f"""---
library_name: peft
base_model: {summary['model']}
tags: [edge-vit, lora, visual-instruction-tuning, {summary['model_type']}]
---

# edge-vit adapter: stage {summary['stage']} ({summary['model_type']})

Trained with `edge-vit finetune train` on `{summary['model']}`: {what}.
Load it with `edge-vit finetune merge --base {summary['model']} --adapter <this folder> --out <merged>`
or `edge-vit finetune eval --vlm {summary['model']} --adapter <this folder> ...`.

## Data
- file: `{summary['data']['file']}` ({summary['data']['samples']} samples), sha256 `{summary['data']['sha256']}`
- data manifest hash (the YOLO dataset it was built from): `{summary['data']['manifest_hash']}`

## Stages
| stage | base | data (sha256) | steps | final loss |
|---|---|---|---|---|
{stages}

## This run
- steps: {summary['steps']} of {summary['total_steps']}, {summary['samples_seen']} samples seen, \
{summary['world_size']} process(es) on {summary['device']}
- loss: first {_fmt(summary['first_loss'])}, final {_fmt(summary['final_loss'])} (mean of the last steps)
- trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,} ({summary['trainable_by_part']})
- visual tokens per sample: {summary['visual_tokens_per_sample']}
- throughput: {summary['steps_per_s']} steps/s, {summary['samples_per_s']} samples/s; peak memory: {mem}
- loss curve: `loss.png`, per step: `loss.jsonl`

## Hyper-parameters
| option | value |
|---|---|
{hyper}
"""


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def run_training(config: TrainConfig) -> dict:
    """Set up, train, save; returns the summary (on every rank)."""
    recipe = LoRARecipe(config)
    finished = False
    try:
        recipe.setup()
        if recipe.env.main:
            recipe.out.mkdir(parents=True, exist_ok=True)
            s = recipe.dataset
            print(f"edge-vit train: stage {config.stage}, {len(s)} samples, {recipe.total_steps} steps "
                  f"({config.batch_size} x {config.grad_accum} accumulation x {recipe.env.world} processes), "
                  f"{recipe.trainable:,} trainable parameters {recipe.parts}", file=sys.stderr)
        _barrier(recipe.env)
        timing = recipe.train()
        summary = recipe.save_final(timing)
        env = recipe.env
        mine = summary["ranks"][env.rank]
        print(f"edge-vit train: rank {env.rank}/{env.world} done: {timing['steps_run']} steps, {mine['samples']} "
              f"samples, peak RSS {mine['peak_rss_mb']} MB", file=sys.stderr)
        finished = True
        return summary
    finally:
        recipe.cleanup(finished)
