"""Synced deconvolution statistics when a process' batch is empty (deconv_zoo.distributed).

Two gloo processes on CPU. The process group's timeout is short, so that a collective one
process skips fails the test in seconds instead of hanging it (the empty batch deadlocked).
"""
import datetime
from pathlib import Path
from typing import List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deconv_zoo.distributed import convert_sync_deconv
from deconv_zoo.layers import Delinear, FastDeconv, smallest_training_batch

TIMEOUT = datetime.timedelta(seconds=20)


def _layers() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList([
        torch.nn.Conv2d(4, 4, 1),  # in front: the whitening's input needs a gradient (backward all-reduces)
        FastDeconv(4, 4, 3, padding=1, block=4),
        FastDeconv(4, 4, 1, stride=2, block=4),  # 1x1: pixel sampling (an all-gather of the counts)
        Delinear(16, 3, block=4),
    ]).double()


def _run(layers: torch.nn.ModuleList, x: torch.Tensor) -> List[torch.Tensor]:
    h = layers[0](x)
    return [layers[1](h), layers[2](h), layers[3](h[:, :, :2, :2].reshape(len(x), 16))]


def _empty_batch_worker(rank: int, store: str, result_file: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2, timeout=TIMEOUT)
    torch.manual_seed(1)
    batch = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    result = {}
    # Rank 0's batch is empty, rank 1 has all of it.
    layers = convert_sync_deconv(_layers())
    outputs = _run(layers, batch[:0] if rank == 0 else batch)
    sum(out.square().sum() for out in outputs).backward()
    grads = [p.grad.clone() for p in layers.parameters()]
    for grad in grads:
        dist.all_reduce(grad)
    result.update(outputs=[o.detach() for o in outputs], grads=grads, buffers=dict(layers.named_buffers()))
    # Every batch empty: empty outputs, the state left as it was (as one process does).
    layers = convert_sync_deconv(_layers())
    result['all_empty'] = [o.shape for o in _run(layers, batch[:0])]
    result['all_empty_buffers'] = {name: b.clone() for name, b in layers.named_buffers()}
    # One Delinear chunk in all: refused on both processes (one process refuses it too).
    try:
        convert_sync_deconv(torch.nn.ModuleList([Delinear(4, 3, block=4)]))[0](torch.randn(1 - rank, 4))
        result['one_chunk'] = None
    except ValueError as error:
        result['one_chunk'] = str(error)
    # A 1x1 whitening of 1x1 maps samples every 9th image of the concatenated batch: a batch of 10
    # in one process, of 5 on each of two processes.
    gate = convert_sync_deconv(torch.nn.Sequential(FastDeconv(4, 4, 1, block=4)).double())
    result['smallest_batch'] = smallest_training_batch(gate, (4, 1, 1))
    gate(torch.randn(5, 4, 1, 1, dtype=torch.float64))  # one sample here, two in all: it trains
    gathered = [None] * 2
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, result_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_an_empty_batch_on_one_process_takes_part_in_the_synced_statistics(tmp_path: Path) -> None:
    """FastDeconv and Delinear skip the statistics of an empty batch, so the process holding one
    never joined the all-reduces and the others waited for ever. It now contributes no samples:
    the result is one process on the concatenated batch, on both processes."""
    result_file = str(tmp_path / 'result.pt')
    mp.spawn(_empty_batch_worker, args=(str(tmp_path / 'store'), result_file), nprocs=2)
    empty, full = torch.load(result_file, weights_only=False)

    torch.manual_seed(1)
    batch = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    reference = _layers()
    outputs = _run(reference, batch)
    sum(out.square().sum() for out in outputs).backward()
    for synced, output, empty_output in zip(full['outputs'], outputs, empty['outputs']):
        torch.testing.assert_close(synced, output.detach(), rtol=1e-10, atol=1e-10)
        assert empty_output.shape == (0,) + output.shape[1:]
    for synced, param in zip(full['grads'], reference.parameters()):
        torch.testing.assert_close(synced, param.grad, rtol=1e-9, atol=1e-9)
    for name, buffer in reference.named_buffers():
        for part in (empty, full):  # both processes hold the global batch's statistics
            torch.testing.assert_close(part['buffers'][name], buffer, rtol=1e-12, atol=1e-12)

    fresh = dict(_layers().named_buffers())
    for part in (empty, full):
        assert part['all_empty'] == [torch.Size([0, 4, 5, 5]), torch.Size([0, 4, 3, 3]), torch.Size([0, 3])]
        for name, buffer in fresh.items():
            assert torch.equal(part['all_empty_buffers'][name], buffer), name
        assert 'more than one 4-feature chunk in the training batches of all processes, got 1' in part['one_chunk']
        assert part['smallest_batch'] == (5, '0')
