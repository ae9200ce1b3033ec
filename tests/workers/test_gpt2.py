"""A GPT-2 from ``transformers`` (a small config, no download) trained byte-level through the service by 2 worker
threads with the usual recipe (AdamW, no weight decay on biases and norms, warmup then cosine, clipping at 1.0,
tied embeddings) equals local training bit for bit, over both transports."""

from __future__ import annotations

import copy

import pytest
import torch

import paramserver as ps
from paramserver.service.local import serve_local
from tests.helpers.reference import Reference, run_threads
from workers.demos import gpt2
from workers.remote_optimizer import RemoteOptimizer

pytest.importorskip("transformers")
W, STEPS, WARMUP = 2, 4, 2


@pytest.mark.parametrize("transport", ["shared_memory", "grpc"])
def test_gpt2_through_the_service_equals_local_training(transport):
    data = gpt2.stdlib_text(50_000)
    base = gpt2.make_gpt2()
    models = [copy.deepcopy(base) for _ in range(W)]
    ref_model = copy.deepcopy(base)
    kwargs = {k: v for k, v in gpt2.RECIPE.items() if k != "weight_decay"}
    ref = Reference(gpt2.param_groups(ref_model), torch.optim.AdamW, kwargs, clip=ps.ClipConfig(max_norm=1.0),
                    scheduler=lambda o: gpt2.local_schedule(o, WARMUP, STEPS))
    name, sched_kwargs = gpt2.schedule(WARMUP, STEPS)
    with serve_local(2) as service:
        opts: list[RemoteOptimizer | None] = [None] * W

        def create(rank: int) -> None:
            opts[rank] = RemoteOptimizer(gpt2.param_groups(models[rank]), torch.optim.AdamW, address=service.address, job="gpt2",
                                         num_workers=W, rank=rank, clip_grad_norm=1.0, scheduler=name, scheduler_kwargs=sched_kwargs,
                                         timeout=60, transport=transport, **kwargs)

        run_threads(W, create)
        try:
            assert [o.transport for o in opts] == [transport] * W
            # tied input and output embeddings are one parameter of the job
            assert sum(1 for p in opts[0].plan.params if p.name == "transformer.wte.weight") == 1
            assert not any(p.name == "lm_head.weight" for p in opts[0].plan.params)
            losses = []
            for step in range(STEPS):
                def work(rank: int) -> None:
                    opts[rank].zero_grad()
                    gpt2.loss_of(models[rank], gpt2.batch(data, step, rank)).backward()
                    opts[rank].step()

                run_threads(W, work)
                grads = []
                for rank in range(W):
                    ref_model.zero_grad()
                    loss = gpt2.loss_of(ref_model, gpt2.batch(data, step, rank))
                    loss.backward()
                    grads.append([p.grad.clone() for p in ref.params])
                    losses.append(loss.item())
                ref.step(grads)
                assert opts[0].get_last_lr() == [g["lr"] for g in ref.optimizer.param_groups]
            for model in models:
                for (n, got), (_, want) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
                    assert torch.equal(got, want), n
            assert models[0].lm_head.weight is models[0].transformer.wte.weight  # still tied
        finally:
            for o in opts:
                if o is not None:
                    o.close()
