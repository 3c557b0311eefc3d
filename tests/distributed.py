"""A harness for multi-process tests on the CPU: spawn `world_size` processes on gloo, each with torchrun's
environment variables, run one function in each, and return each rank's result. A hard timeout kills
every process, so a hung collective fails the test instead of hanging the suite. The ranks see no GPU
(CUDA_VISIBLE_DEVICES is empty for them), so on a machine with one they still run on the CPU, as in CI,
instead of asking for one GPU each."""
import io
import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, queue, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        buffer = io.BytesIO()
        torch.save(result, buffer)  # bytes cross the queue safely after this process exits
        queue.put((rank, None, buffer.getvalue()))
    except BaseException:
        queue.put((rank, traceback.format_exc(), None))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size, *args, timeout=180):
    """fn(*args) in each of world_size processes; returns [result of rank 0, rank 1, ...]."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_entry, args=(fn, rank, world_size, port, queue, args), daemon=True)
                 for rank in range(world_size)]
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by each spawned rank at its start
    try:
        for process in processes:
            process.start()
    finally:
        if shown is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = shown
    results, errors = {}, []
    try:
        for _ in range(world_size):
            try:
                rank, error, payload = queue.get(timeout=timeout)
            except Exception:
                raise TimeoutError(f"{world_size - len(results) - len(errors)} of {world_size} ranks gave no "
                                   f"result within {timeout} s (a hung collective?)") from None
            if error:
                errors.append(f"rank {rank}:\n{error}")
                break  # the other ranks are probably stuck waiting for this one
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for process in processes:
            process.join(timeout=5 if not errors else 0.1)
            if process.is_alive():
                process.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[rank] for rank in range(world_size)]
