"""Training on several GPUs of one machine (or several CPU processes, for tests): the launch, the
ranks' process group and the few collectives the trainer needs.

**Launch.** ``python -m trainers run SPEC`` checks the spec and makes the memory plan in one process,
then, when ``world_size(spec) > 1``, becomes the launcher: torch's elastic launcher
(``torch.distributed.launcher.api.elastic_launch``, what ``torchrun --standalone`` runs) starts one
rank per GPU with the ``spawn`` start method, a c10d rendezvous on localhost and no restarts. The ranks
are children of the launcher in its process group (``torchrun``'s command-line form would put each
worker in a session of its own, out of reach of a signal to the group), so the executor's SIGTERM and
SIGKILL to the group reach every rank, and so does the runner's reaping after a daemon crash. The
launcher leaves SIGTERM/SIGINT to the ranks (they got it too: they agree on a step, save one checkpoint
and exit 75) and waits; its exit status is the first failing rank's (75, 2, 1; a rank killed by a
signal: 1), 0 when every rank exits 0.

**Ranks.** Rank r uses ``cuda:r`` (NCCL) or the CPU (gloo). The student is sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``: each decoder layer, then the whole; fp32 parameters,
gradients and AdamW state are split over the ranks). So is the teacher (``shard``: inference only, no
gradients, no optimizer state; its parameters stay in their storage dtype): each decoder layer is
gathered for its forward and freed after it, the root's (embeddings, final norm, head) around each use
(``gathered_root``). Both are loaded whole on every rank before they are sharded (rank 0 evaluates
the starting student with them), and the teacher is gathered whole again on every rank after training
(``keep_gathered``: rank 0 evaluates the final model with it alone). Gradients are reduced as a sum
(the loss is already divided by the global token count), so the update equals one process's on the
same global batch.

**World size** (``world_size``): ``optim.num_gpus`` when set, else every GPU the trainer sees
(``CUDA_VISIBLE_DEVICES``: the runner exports ``ATLASD_CUDA_VISIBLE_DEVICES`` as that); on device
``cpu``, ``optim.num_gpus`` gloo processes (default 1); device ``auto`` without CUDA: one. One rank is the
single-process trainer of before, with no process group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from atlasd.runspec import EXIT_FAILED, RunSpec

T = TypeVar("T")
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)  # rank 0 evaluates alone while the others wait


def world_size(spec: RunSpec) -> int:
    """How many ranks train ``spec`` (see the module docstring); ValueError when ``optim.num_gpus``
    asks for more GPUs than the trainer sees."""
    wanted = spec.optim.num_gpus
    if spec.device == "cpu":
        return wanted or 1
    if not torch.cuda.is_available():  # device auto on a machine without GPUs: one process, as before
        return 1
    visible = torch.cuda.device_count()
    if wanted is not None and wanted > visible:
        raise ValueError(f"optim.num_gpus is {wanted} but the trainer sees {visible} GPU(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return wanted or max(1, visible)


# --- the launcher ------------------------------------------------------------------------------
def launch(world: int, entry: Callable[..., None], *args: Any) -> int:
    """Run ``entry(*args)`` in ``world`` ranks on this machine and wait; the exit status as the module
    docstring says. ``entry`` must be a module-level function (it is pickled to spawned processes)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=f"atlasd-{uuid.uuid4().hex[:12]}",
        # no torchelastic_* folder per launch in /tmp: the ranks' output goes to the trainer's own
        # stdout/stderr (no redirects), and the exit status comes from the processes, not error files
        logs_specs=DefaultLogsSpecs(log_dir=os.devnull),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
        monitor_interval=0.2, signals_to_handle="SIGHUP,SIGQUIT",  # SIGTERM/SIGINT: the ranks' business
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        elastic_launch(config, entry)(*args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        print(f"trainers: rank {rank} was killed by signal {failure.signal_name()}", file=sys.stderr)
        return EXIT_FAILED
    return 0


# --- inside a rank -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    """This process's place in the group; ``world == 1``: no process group, every method is local."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @classmethod
    def join(cls, device_type: str) -> Ranks:
        """Join the launcher's process group (env:// from the elastic agent): NCCL on CUDA, gloo on CPU."""
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
        return cls(rank, world)

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` on CUDA."""
        return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if self.sharded and device.type == "cuda" else device

    def leave(self) -> None:
        if self.sharded:
            import torch.distributed as dist

            dist.destroy_process_group()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (a stop request: all ranks stop at one step)."""
        return bool(self.sum(float(flag)))

    def sum(self, value: float) -> float:
        if not self.sharded:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.sharded:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 alone, its result on every rank; when it raises, rank 0 re-raises and the
        others raise ``Interrupted`` (rank 0 was interrupted) or ``RuntimeError``."""
        if not self.sharded:
            return fn()
        import torch.distributed as dist

        from trainers.gkd import Interrupted

        box: list[Any] = [None]
        error = None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001  (re-raised below, after the others were told)
                error = exc
                box[0] = ("interrupted" if isinstance(exc, Interrupted) else "failed", str(exc))
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        if error is not None:
            raise error
        status, value = box[0]
        if status == "interrupted":
            raise Interrupted(value)
        if status == "failed":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


ALONE = Ranks()  # one process, no process group


def shard(model: torch.nn.Module, layers: torch.nn.ModuleList) -> None:
    """FSDP2 over the process group: each decoder layer, then ``model`` (the root holds the rest: the
    embeddings, the final norm and the head). Parameters keep their dtype (no mixed-precision policy);
    the layers reshard after their forward, so one layer is whole at a time (with FSDP2's all-gather
    buffers), besides the root's parameters while they are gathered. The teacher (inference only: no
    gradients, no optimizer state) is sharded with this as is, under its ``trainers.gkd.TeacherHidden``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def shard_student(model: torch.nn.Module, layers: torch.nn.ModuleList) -> None:
    """``model`` (the student under its loss module) sharded as ``shard`` says; gradients are reduced as
    a plain sum."""
    from torch.distributed.fsdp import FSDPModule

    shard(model, layers)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


def keep_gathered(root) -> None:
    """Gather every FSDP2 unit under ``root`` whole on every rank (collectives: all ranks call this) and
    keep it so: no unit reshards after a forward any more, so one rank alone can then run the model (rank
    0's final evaluation with the teacher). The root is set up first, as in ``gathered_root``."""
    from torch.distributed.fsdp import FSDPModule

    root._get_fsdp_state()._lazy_init()
    root.set_reshard_after_forward(False)  # recursive
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.unshard()


@contextlib.contextmanager
def gathered_root(model, *, frozen: bool = False) -> Iterator[None]:
    """The FSDP2 root's own parameters (embeddings, final norm, head) gathered around a ``generate`` of
    the sharded student or teacher (``generate`` calls the HF model inside the root, not the root itself;
    the layers gather themselves in their forward), and around a micro-batch's teacher forward and the loss
    forward and backward that read the teacher's head. The root is set up first, as its first forward
    would do (``_lazy_init``: FSDP2 has no public call for it), or the first layer to run would take its
    place. A collective: all ranks enter. ``frozen`` (the teacher, which never runs a backward): on exit
    every unit is resharded and FSDP2's per-iteration records are cleared (``reset_iter_state``; otherwise
    only a backward clears them, and they would grow with every forward)."""
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        if frozen:
            model.reset_iter_state()
        else:
            model.reshard()
