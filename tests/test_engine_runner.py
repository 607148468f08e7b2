"""EngineRunner: the shard's engine work runs on one thread (the main thread in serve_forever)."""

from __future__ import annotations

import threading

import pytest

from tgi_space.server.service import EngineRunner


def _start(runner: EngineRunner) -> tuple[threading.Thread, threading.Event]:
    stopped = threading.Event()
    thread = threading.Thread(target=runner.run_until, args=(stopped, 0.01))
    thread.start()
    while not runner.active:
        pass
    return thread, stopped


def test_calls_from_many_threads_run_on_the_runner_thread_with_their_results_and_errors():
    runner = EngineRunner()
    thread, stopped = _start(runner)
    seen, errors = [], []

    def rpc(i: int) -> None:
        seen.append((i, runner.call(lambda: (threading.get_ident(), i * i))))
        with pytest.raises(ValueError, match="bad 3"):
            runner.call(lambda: (_ for _ in ()).throw(ValueError("bad 3")))
        errors.append(i)

    callers = [threading.Thread(target=rpc, args=(i,)) for i in range(8)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    stopped.set()
    thread.join()
    assert sorted(i for i, _ in seen) == list(range(8)) and sorted(errors) == list(range(8))
    assert {ident for _, (ident, _) in seen} == {thread.ident}  # one thread ran them all
    assert all(result == i * i for i, (_, result) in seen)


def test_without_a_running_loop_calls_run_inline_and_after_stop_too():
    runner = EngineRunner()
    assert runner.call(threading.get_ident) == threading.get_ident()
    thread, stopped = _start(runner)
    stopped.set()
    thread.join()
    assert runner.call(threading.get_ident) == threading.get_ident()  # no hang after the loop ended
