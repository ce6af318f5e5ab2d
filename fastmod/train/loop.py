"""The training loop: one ``Trainer`` per process (one per rank under torchrun).

Each step: forward under autocast -> loss -> a finite-loss check and the
stop-signal flag, all-reduced in one tiny collective so every rank takes the
same decision -> backward (grad scaler for fp16) -> optional clipping -> the
optimiser scheme's active optimisers and schedulers step.

Exact resumption: the data order of an epoch is a function of (seed, epoch)
only (DistributedSampler, also for one process), the loop records how many
batches of the epoch it consumed and skips them on resume, and RNG states are
restored after the epoch's DataLoader iterator exists, so a resumed run replays
the uninterrupted run bit for bit on the same hardware and config.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from fastmod.train import checkpoint as ckpt_io
from fastmod.train import distributed, metrics, plots
from fastmod.train.registry import ModelContext, ModelSpec


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf and ``train.nonfinite`` is ``stop``."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved."""

    def __init__(self, signum: int, path: Path | None, step: int):
        self.signum, self.path, self.step = signum, path, step
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")


def split_output(out):
    """Models return logits or (logits, aux_loss)."""
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, None


def move_batch(batch: dict, visual_key: str, device: torch.device):
    nb = device.type == "cuda"
    q = batch["question"].to(device, non_blocking=nb)
    qlen = batch["question_len"].to(device, non_blocking=nb)
    vis = batch[visual_key].to(device, non_blocking=nb).float()
    ans = batch["answer"].to(device, non_blocking=nb)
    return q, qlen, vis, ans


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, loader, visual_key: str, device: torch.device, amp: str, info: distributed.DistInfo,
             types, subtypes, progress: bool = False, desc: str = "eval") -> dict:
    """Accuracy (overall / per type / per subtype) and mean loss over ``loader``,
    reduced over ranks.  ``model`` is the bare module (no DDP wrapper)."""
    was_training = model.training
    model.eval()
    acc = metrics.TypedAccuracy(types, subtypes, device)
    it = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for batch in it:
        q, qlen, vis, ans = move_batch(batch, visual_key, device)
        with autocast(device, amp):
            logits, _ = split_output(model(q, qlen, vis))
        loss_sum = F.cross_entropy(logits.float(), ans, reduction="sum")
        acc.update(logits.argmax(1), ans, batch["qtype"], batch["qsubtype"], loss_sum)
    model.train(was_training)
    return acc.reduce(info).summary()


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT: Ctrl-C reaches the whole process group, and
    the main process, not a dying worker, decides how to stop (checkpoint first)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Trainer:
    def __init__(self, cfg: dict, spec: ModelSpec, data, run_dir: Path, device: torch.device,
                 info: distributed.DistInfo, resume: dict | None = None, log=print):
        self.cfg, self.spec, self.data, self.run_dir = cfg, spec, data, Path(run_dir)
        self.device, self.info, self.log = device, info, log
        tc = cfg["train"]
        self.amp = tc["amp"]
        self.types, self.subtypes = data.types, data.subtypes

        torch.manual_seed(tc["seed"])  # same initial weights on every rank
        ctx = ModelContext(num_tokens=data.num_tokens, num_answers=data.num_answers,
                           visual_shape=tuple(data.visual_shape), is_pixels=data.visual_key == "image")
        self.model = spec.build(cfg["model"], ctx).to(device)
        self.scheme = spec.optimizers(self.model, cfg["optim"])
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == "fp16" else None

        self.step = 0             # optimiser steps taken (skipped batches do not count)
        self.epoch = 0
        self.batch_in_epoch = 0   # batches of self.epoch already consumed
        self.best = {"acc": -1.0, "step": -1}
        self.best_summary = None  # per-type accuracy of best.pt (this session's evaluations)
        self.skipped = 0
        self._rng_to_restore = None
        if resume is not None:
            self._load(resume)

        self.train_model = self.model
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=spec.find_unused_parameters)
        self.eval_model = self.model
        if tc["compile"]:
            self.train_model = torch.compile(self.train_model)
            self.eval_model = torch.compile(self.model)

        self.sampler = DistributedSampler(data.train, num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=tc["seed"], drop_last=True)
        self.steps_per_epoch = len(self.sampler) // tc["batch_size"]
        if self.steps_per_epoch == 0:
            from fastmod.train.config import UsageError

            raise UsageError(f"the training set ({len(data.train)} questions over {info.world_size} rank(s)) "
                             f"is smaller than one batch (train.batch_size={tc['batch_size']})")
        # train.steps, when set, replaces train.epochs as the length of the run
        # (optimiser steps; skipped batches do not count).  Epochs count batches.
        self.max_steps = tc["steps"]
        self.total_steps = tc["steps"] if tc["steps"] else tc["epochs"] * self.steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch) if tc["steps"] else tc["epochs"]
        self.metrics = metrics.MetricsLog(self.run_dir, enabled=info.is_main, tensorboard=tc["tensorboard"])
        self._stop_signal = 0
        self._last_eval_step = -1

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"format": ckpt_io.FORMAT, "model_name": self.spec.name, "config": self.cfg,
                "model": self.model.state_dict(), "optim": self.scheme.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "best": dict(self.best), "skipped": self.skipped, "world_size": self.info.world_size,
                "vocab": self.data.vocab_state, "visual_key": self.data.visual_key,
                "visual_shape": list(self.data.visual_shape)}

    def _load(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        self.scheme.load_state_dict(ck["optim"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.step, self.epoch, self.batch_in_epoch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        self.best, self.skipped = dict(ck["best"]), ck.get("skipped", 0)
        rngs = ck["rng"]
        if ck.get("world_size", 1) != self.info.world_size:
            self.log(f"note: checkpoint was written by {ck.get('world_size')} rank(s), resuming on "
                     f"{self.info.world_size}: the data order and RNG streams will differ from an "
                     "uninterrupted run")
            self.batch_in_epoch = 0
            self.epoch += 1 if ck["batch_in_epoch"] else 0
        self._rng_to_restore = rngs[self.info.rank % len(rngs)]

    def save(self, best: bool = False) -> Path | None:
        """Write last.pt (and best.pt) on rank 0; every rank must call this (RNG gather)."""
        self._sync_buffers()
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # identical weights on every rank, so every rank raises
            raise NonFiniteLoss(f"parameters {bad[:3]} hold NaN/inf at step {self.step}; "
                                "not overwriting the last checkpoint")
        state_rng = distributed.all_gather_object(ckpt_io.rng_state(), self.info)
        path = None
        if self.info.is_main:
            state = self.state()
            state["rng"] = state_rng
            path = self.run_dir / ckpt_io.LAST
            ckpt_io.atomic_save(state, path)
            if best:
                ckpt_io.atomic_save(state, self.run_dir / ckpt_io.BEST)
        distributed.barrier(self.info)
        return path

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame):
        if self._stop_signal:  # second signal: give up immediately
            raise KeyboardInterrupt
        self._stop_signal = signum
        if self.info.is_main:
            print(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, "
                  "then exiting (send it again to abort without saving)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def _signals(self):
        old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread
                pass
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ loop
    def _loader(self, dataset, sampler, batch_size):
        from fastmod.data import make_loader

        loader = make_loader(dataset, batch_size, shuffle=False, sampler=sampler, seed=self.cfg["train"]["seed"],
                             num_workers=self.cfg["data"]["num_workers"], drop_last=False)
        loader.worker_init_fn = ignore_interrupts
        return loader

    def _sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm running stats) to every rank, as DDP does at the
        start of each forward: so validation and the final model agree across ranks."""
        if self.info.enabled:
            import torch.distributed as dist

            for b in self.model.buffers():
                dist.broadcast(b, src=0)

    def validate(self) -> dict:
        self._sync_buffers()
        loader = self._loader(self.data.val, distributed.ShardSampler(len(self.data.val), self.info),
                              self.cfg["train"]["eval_batch_size"])
        # Validation must not move the RNG streams: a run validated at step k and one
        # that was not (e.g. a run resumed from step k) must train identically after it.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            s = evaluate(self.eval_model, loader, self.data.visual_key, self.device, self.amp, self.info,
                         self.types, self.subtypes, progress=self._progress(), desc="val")
        self._last_eval_step = self.step
        return s

    def _progress(self) -> bool:
        return bool(self.cfg["train"]["progress"]) and self.info.is_main

    def _train_step(self, batch, window: metrics.TypedAccuracy) -> bool:
        """One batch; returns False when the batch was skipped (non-finite loss)."""
        q, qlen, vis, ans = move_batch(batch, self.data.visual_key, self.device)
        with autocast(self.device, self.amp):
            logits, aux = split_output(self.train_model(q, qlen, vis))
        loss = F.cross_entropy(logits.float(), ans)
        if aux is not None:
            loss = loss + aux.float()
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                             torch.tensor(float(self._stop_signal > 0), device=loss.device)])
        distributed.all_reduce_sum(flags, self.info)
        flags = flags.tolist()
        if flags[1] > 0 and not self._stop_signal:
            self._stop_signal = signal.SIGTERM  # another rank was signalled
        if flags[0] > 0:
            where = f"step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch_in_epoch + 1})"
            if self.cfg["train"]["nonfinite"] == "stop":
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at {where}; stopping. The last "
                                    f"checkpoint is intact; set train.nonfinite=skip to skip such batches")
            self.skipped += 1
            self.scheme.zero_grad()
            if self.info.is_main:
                self.metrics.log("skip", self.step, epoch=self.epoch, batch=self.batch_in_epoch)
            return False
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        active = self.scheme.active(self.step)
        clip = self.cfg["train"]["grad_clip"]
        if clip:
            if self.scaler:
                for n in active:
                    self.scaler.unscale_(self.scheme.optimizers[n])
            torch.nn.utils.clip_grad_norm_(self.scheme.params(active), clip)
        for n in active:
            opt = self.scheme.optimizers[n]
            self.scaler.step(opt) if self.scaler else opt.step()
        if self.scaler:
            self.scaler.update()
        self.scheme.step_schedulers(active)
        self.scheme.zero_grad()
        window.update(logits.detach().argmax(1), ans, batch["qtype"], batch["qsubtype"],
                      loss.detach() * ans.numel())
        return True

    def _log_train(self, window: metrics.TypedAccuracy, t0: float, bar) -> None:
        s = window.reduce(self.info).summary()
        dt = max(time.perf_counter() - t0, 1e-9)
        rec = {"epoch": self.epoch, "loss": s["loss"], "acc": s["overall"],
               "samples_per_s": s["num_questions"] / dt, "lr": self.scheme.lrs()}
        if self.info.is_main:
            self.metrics.log("train", self.step, **rec)
            if bar is not None:
                bar.set_postfix(loss=f"{s['loss']:.3f}", acc=f"{100 * s['overall']:.1f}%",
                                sps=f"{rec['samples_per_s']:.0f}/s")

    def _after_eval(self, s: dict) -> bool:
        improved = s["overall"] > self.best["acc"]
        if improved:
            self.best = {"acc": s["overall"], "step": self.step}
            self.best_summary = s
        if self.info.is_main:
            self.metrics.log("val", self.step, epoch=self.epoch, loss=s["loss"], acc=s["overall"],
                             types=s["types"], subtypes=s["subtypes"], best=improved)
            self.log(f"[step {self.step}, epoch {self.epoch}] val acc {100 * s['overall']:.2f}% "
                     f"loss {s['loss']:.4f}{' (best)' if improved else ''}")
        return improved

    def _done(self, steps_only: bool = False) -> bool:
        if self.max_steps:
            return self.step >= self.max_steps
        return not steps_only and self.epoch >= self.num_epochs

    def fit(self) -> dict:
        tc = self.cfg["train"]
        if self._rng_to_restore is None:
            torch.manual_seed(tc["seed"] + 1000 * self.info.rank)  # dropout streams differ per rank
        last_val = None
        with self._signals():
            while not self._done():
                self.sampler.set_epoch(self.epoch)
                skip = self.batch_in_epoch * tc["batch_size"]
                loader = self._loader(self.data.train, distributed.SkipSampler(self.sampler, skip),
                                      tc["batch_size"])
                rng = torch.get_rng_state()
                batches = iter(loader)        # may draw a worker seed from the global RNG
                torch.set_rng_state(rng)
                if self._rng_to_restore is not None:
                    ckpt_io.set_rng_state(self._rng_to_restore)
                    self._rng_to_restore = None
                bar = None
                if self._progress():
                    from tqdm.auto import tqdm

                    bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, dynamic_ncols=True,
                               desc=f"epoch {self.epoch + 1}/{self.num_epochs}")
                window = metrics.TypedAccuracy(self.types, self.subtypes, self.device)
                t0 = time.perf_counter()
                try:
                    while self.batch_in_epoch < self.steps_per_epoch and not self._done(steps_only=True):
                        batch = next(batches)
                        stepped = self._train_step(batch, window)
                        self.batch_in_epoch += 1
                        if bar is not None:
                            bar.update(1)
                        if not stepped:
                            continue
                        self.step += 1
                        if self.step % tc["log_every"] == 0:
                            self._log_train(window, t0, bar)
                            window = metrics.TypedAccuracy(self.types, self.subtypes, self.device)
                            t0 = time.perf_counter()
                        if tc["eval_every"] and self.step % tc["eval_every"] == 0:
                            last_val = self.validate()
                            self.save(best=self._after_eval(last_val))
                            t0 = time.perf_counter()  # throughput counts training time only
                        elif self.step % tc["ckpt_every"] == 0:
                            self.save()
                        if self._stop_signal:
                            path = self.save()
                            raise Interrupted(self._stop_signal, path, self.step)
                finally:
                    if bar is not None:
                        bar.close()
                    del batches
                if self.batch_in_epoch >= self.steps_per_epoch:  # epoch complete
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if self._last_eval_step != self.step:
                        last_val = self.validate()
                        self.save(best=self._after_eval(last_val))
                    else:
                        self.save()
        if self._last_eval_step != self.step or last_val is None:
            last_val = self.validate()
            self.save(best=self._after_eval(last_val))
        if self.info.is_main:
            self.metrics.log("end", self.step, epoch=self.epoch, best=self.best, skipped=self.skipped)
        return last_val

    def close(self) -> None:
        self.metrics.close()
        if self.info.is_main and self.cfg["train"]["plots"]:
            try:
                plots.save_plots(metrics.read_log(self.metrics.path), self.run_dir)
            except Exception as e:  # a plot is never worth failing a finished run
                self.log(f"warning: could not draw plots: {e}")


def trim_log(path: Path, step: int) -> None:
    """Drop log records written after ``step`` (the run is resumed from there)."""
    if not path.exists():
        return
    keep = [r for r in metrics.read_log(path) if r.get("step", 0) <= step and r.get("kind") != "end"]
    ckpt_io.atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
